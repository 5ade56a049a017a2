"""Triton kernel tests on a CPU-only machine: parity under the interpreter, and Hopper (sm_90) compiles.

Kernel modules are imported with :func:`interpreted` (Triton picks the interpreter when it decorates a kernel, so
the parity tests really run the kernel code on the CPU); the compile check (:func:`compile_for_hopper`) runs in a
subprocess with the variable unset, where the same kernels are real ``JITFunction``s.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def interpreted(module: str):
    """Import ``module`` (e.g. ``ham_export.kernels.gdn``) with TRITON_INTERPRET=1, so that its kernels run on the CPU.

    Skips the calling test module when Triton is not installed.
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import too: parts of it read the variable then
    try:
        pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.7.1, the version "
                                             "torch 2.13 pins)")
        return importlib.import_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


_COMPILE = textwrap.dedent("""
    import importlib, json, os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(sys.argv[1])
    out = {}
    for name, (types, constexprs) in json.loads(sys.argv[2]).items():
        fn = getattr(module, name)
        assert isinstance(fn, JITFunction), type(fn)
        signature = {a: ("constexpr" if a in constexprs else types.get(a, "i32")) for a in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32))
        ptx = k.asm.get("ptx", "")
        out[name] = {"ptx": len(ptx), "cubin": len(k.asm.get("cubin", b"")),
                     "entry": ".entry " + fn.__name__ in ptx, "sm_90": ".target sm_90" in ptx}
    print(json.dumps(out))
""")


def compile_for_hopper(module: str, kernels: dict[str, tuple[dict[str, str], dict[str, int]]]) -> None:
    """Compile each kernel of ``module`` for sm_90 (no GPU needed) and assert PTX and a cubin came out.

    ``kernels`` maps a kernel's name to (types, constexprs): types names the non-i32 arguments (``*fp32``,
    ``*bf16``, ``*i64``, ``fp32``, ...), constexprs gives every ``tl.constexpr`` its value.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JITFunctions in the child
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _COMPILE, module, json.dumps(kernels)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(result) == sorted(kernels)
    for name, got in result.items():
        assert got["ptx"] > 0 and got["cubin"] > 0, (name, got)
        assert got["entry"] and got["sm_90"], (name, got)
