"""The ``ham`` torch ops: the kernel each call runs (explicit, logged, overridable, never a silent switch), and the
in-place form on the CUDA path, which writes the caches where they lie.

On this CPU machine the Triton kernels run on CPU tensors under the interpreter, inside
:func:`ham_export.ops.library.triton_on_cpu` (exactly the code the CUDA registration runs); the test marked ``gpu``
runs the CUDA registrations through ``torch.ops.ham`` where a GPU exists.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from ham_export.ops import library
from ham_export.ops import reference as ref

from .conftest import available
from .implementations import IMPLEMENTATIONS, ROOT
from .inputs import append, attention, dispatch_cases, gdn

TRITON = next(i for i in IMPLEMENTATIONS["cache_append"] if i.name == "triton")
CASES = dispatch_cases()
IDS = ["attention-T1", "attention-T5", "append-drop", "append-evict", "append-in-place", "gdn"]


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.delenv(library.FORCE_REFERENCE, raising=False)
    library._logged.clear()


@pytest.mark.parametrize(("op", "inputs", "attributes", "target"), CASES, ids=IDS)
def test_each_call_runs_its_kernel_and_says_so_once(op, inputs, attributes, target, fresh_log, caplog):
    available(TRITON)
    with caplog.at_level(logging.INFO, logger=library.__name__), library.triton_on_cpu():
        _, fn = library.select_kernel(op, "cpu", *inputs, *attributes)
        library.select_kernel(op, "cpu", *inputs, *attributes)
        got = getattr(torch.ops.ham, op)(*[x.clone() for x in inputs], *attributes)
    module, function = target.split(":")
    assert fn.__module__ == f"ham_export.kernels.{module}" and fn.__name__ == function
    assert [r.getMessage() for r in caplog.records] == [f"ham::{op} on cpu: Triton ham_export.kernels.{target}"]
    want = library.REFERENCES[op](*[x.clone() for x in inputs], *attributes)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_cpu_tensors_run_the_reference_by_default(fresh_log, caplog):
    inputs = attention(1, 1, 1, 4)
    with caplog.at_level(logging.INFO, logger=library.__name__):
        label, fn = library.select_kernel("cache_attention", "cpu", *inputs)
    assert fn is ref.cache_attention and label == "reference"
    assert caplog.records[0].getMessage() == "ham::cache_attention on cpu: reference"


def test_the_environment_variable_forces_the_reference(monkeypatch, caplog):
    monkeypatch.setenv(library.FORCE_REFERENCE, "1")
    library._logged.clear()
    with caplog.at_level(logging.INFO, logger=library.__name__):
        _, fn = library.select_kernel("cache_attention", "cuda", *attention(1, 1, 1, 4))
    assert fn is ref.cache_attention
    assert "reference (HAM_FORCE_REFERENCE is set)" in caplog.text


def test_a_missing_kernel_is_an_error_not_a_silent_switch(fresh_log, monkeypatch):
    monkeypatch.setitem(library.TRITON_KERNELS, "gdn_prefill", [(lambda *_: True, "triton_is_missing:gdn")])
    monkeypatch.setitem(sys.modules, "ham_export.kernels.triton_is_missing", None)  # an import that fails
    library.load_kernel.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError):
            library.select_kernel("gdn_prefill", "cuda", *gdn(1, 2, 1, 4, 4))
    finally:
        library.load_kernel.cache_clear()


def test_a_missing_triton_says_how_to_install_it(fresh_log, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    for name in [m for m in sys.modules if m.startswith("ham_export.kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    library.load_kernel.cache_clear()
    try:
        with pytest.raises(library.KernelUnavailableError, match=r"cannot be imported.*HAM_FORCE_REFERENCE=1"):
            library.select_kernel("gdn_prefill", "cuda", *gdn(1, 2, 1, 4, 4))
    finally:
        library.load_kernel.cache_clear()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(library.KernelUnavailableError, match="TRITON_INTERPRET=1"), library.triton_on_cpu():
        pass


def test_the_in_place_op_on_the_cuda_path_writes_the_caches_where_they_lie(fresh_log):
    """ham::cache_append_ on the Triton kernel (the CUDA registration's code, under the interpreter): the caches
    keep their storage, only the new entries change, and nothing is copied."""
    available(TRITON)
    inputs = append(2, 2, 3, 8, lengths=[1, 7], routed_p=1.0, seed=3)
    caches = inputs[:4]
    pointers = [x.data_ptr() for x in caches]
    before = [x.clone() for x in caches]
    want = ref.cache_append(*[x.clone() for x in inputs], "drop")
    with library.triton_on_cpu():
        overflow = torch.ops.ham.cache_append_(*inputs, "drop")
    assert [x.data_ptr() for x in caches] == pointers
    for got, w in zip((*caches, overflow), want, strict=True):
        torch.testing.assert_close(got, w, atol=0, rtol=0, equal_nan=True)
    written = ~((caches[0] == before[0]) | (caches[0].isnan() & before[0].isnan()))
    assert written.any(-1).any(1).tolist() == [[False, True, True, True] + [False] * 4, [False] * 7 + [True]]


_GPU_CHILD = """
import sys, torch
from ham_export.ops import library
from tests.ops.inputs import dispatch_cases
op, inputs, attributes, target = dispatch_cases()[int(sys.argv[1])]
label, fn = library.select_kernel(op, "cuda", *[x.cuda() for x in inputs], *attributes)
assert label.endswith(target), label
cuda = [x.cuda() for x in inputs]
got = getattr(torch.ops.ham, op)(*cuda, *attributes)
want = library.REFERENCES[op](*inputs, *attributes)
got = got if isinstance(got, (tuple, list)) else (got,)
want = want if isinstance(want, tuple) else (want,)
for g, w in zip(got, want, strict=True):
    assert g.is_cuda
    torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4, equal_nan=True)
if op == "cache_append_":  # written where they lie
    for x, w in zip(cuda[:4], want[:4], strict=True):
        torch.testing.assert_close(x.cpu(), w, atol=0, rtol=0, equal_nan=True)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the ops' CUDA registrations")
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_cuda_ops_match_the_reference_on_a_gpu(index):
    """In a child process without TRITON_INTERPRET: the compiled kernels, through torch.ops.ham on CUDA tensors."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", library.FORCE_REFERENCE)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _GPU_CHILD, str(index)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-4000:]
