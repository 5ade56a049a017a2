"""Dispatch of the ham ops to the Triton kernels on CUDA: explicit, logged, overridable, never silent.

On this CPU machine the selection logic runs with CPU tensors and the kernels run under the interpreter; the test
marked ``gpu`` runs the registered CUDA implementations through ``torch.ops.ham`` where a GPU exists.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ham_export import ops
from ham_export import reference as ref

from .dispatch_cases import CASES, attention_args, gdn_args
from .support import ROOT, interpreted

KERNEL_MODULES = {name: interpreted(name) for name in
                  ("kernels.cache_attention", "kernels.prefill_attention", "kernels.cache_append", "kernels.gdn")}


@pytest.mark.parametrize(("op", "args", "module", "function"), CASES,
                         ids=["attention-T1", "attention-T5", "append-drop", "append-evict", "gdn"])
def test_each_op_selects_its_kernel_and_matches_the_reference(op, args, module, function, monkeypatch, caplog):
    monkeypatch.delenv(ops.FORCE_REFERENCE, raising=False)
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="ham_export.ops"):
        fn = ops.select_cuda_kernel(op, *args)
        ops.select_cuda_kernel(op, *args)
    assert fn is getattr(KERNEL_MODULES[module], function)
    assert [r.getMessage() for r in caplog.records] == [f"ham::{op} on CUDA: Triton {module}:{function}"]
    got, want = fn(*args), ops._REFERENCES[op](*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_environment_variable_forces_the_reference(monkeypatch, caplog):
    monkeypatch.setenv(ops.FORCE_REFERENCE, "1")
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="ham_export.ops"):
        fn = ops.select_cuda_kernel("cache_attention", *attention_args(1))
    assert fn is ref.cache_attention
    assert "reference (HAM_FORCE_REFERENCE is set)" in caplog.text


def test_a_missing_kernel_is_an_error_not_a_silent_switch(monkeypatch):
    monkeypatch.delenv(ops.FORCE_REFERENCE, raising=False)
    monkeypatch.setitem(ops.TRITON_KERNELS, "gdn_prefill", [(lambda *_: True, "kernels.no_such_module:gdn")])
    with pytest.raises(ops.KernelUnavailableError, match=r"cannot be imported.*HAM_FORCE_REFERENCE=1"):
        ops.select_cuda_kernel("gdn_prefill", *gdn_args(3))


_GPU_CHILD = """
import sys, torch
from ham_export import ops
from tests.kernels.dispatch_cases import CASES
op, module, function, args = CASES[int(sys.argv[1])][0], *CASES[int(sys.argv[1])][2:], CASES[int(sys.argv[1])][1]
fn = ops.select_cuda_kernel(op, *args)
assert fn.__module__ == module and fn.__name__ == function, (fn.__module__, fn.__name__)
cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
got = getattr(torch.ops.ham, op)(*cuda)
want = ops._REFERENCES[op](*args)
got = got if isinstance(got, (tuple, list)) else (got,)
want = want if isinstance(want, tuple) else (want,)
for g, w in zip(got, want, strict=True):
    assert g.is_cuda
    torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4, equal_nan=True)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the ops' CUDA registrations")
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[2] + "-" + c[0] for c in CASES])
def test_cuda_ops_match_the_reference_on_a_gpu(index):
    """In a child process without TRITON_INTERPRET: the compiled kernels, through torch.ops.ham on CUDA tensors."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ops.FORCE_REFERENCE)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _GPU_CHILD, str(index)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-4000:]
