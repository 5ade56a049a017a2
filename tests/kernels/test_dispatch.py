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

from .support import interpreted

KERNEL_MODULES = {name: interpreted(name) for name in
                  ("kernels.cache_attention", "kernels.prefill_attention", "kernels.cache_append", "kernels.gdn")}


def _attention_args(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, c, k = 2, 2, 24, 16
    k_cache, v_cache = torch.randn(b, h, c, k, generator=g), torch.randn(b, h, c, k, generator=g)
    length = torch.tensor([c, 7])
    k_cache[1, :, 7:] = float("nan")
    v_cache[1, :, 7:] = float("nan")
    q, kn, vn = (torch.randn(b, h, t, k, generator=g) for _ in range(3))
    routed = torch.rand(b, t, generator=g) > 0.4
    return q, k_cache, v_cache, length, kn, vn, routed, torch.tensor([2.0, 3.0])


def _append_args(t: int, policy: str):
    _, k_cache, v_cache, length, kn, vn, routed, _ = _attention_args(t, seed=1)
    score_cache = torch.rand(2, 24)
    score_cache[1, 7:] = float("nan")
    return k_cache, v_cache, score_cache, length, kn, vn, torch.rand(2, t), routed, policy


def _gdn_args(t: int):
    g = torch.Generator().manual_seed(2)
    b, h, k = 1, 2, 16
    q, kk = (ref.l2_normalize(torch.randn(b, t, h, k, generator=g)) for _ in range(2))
    v = torch.randn(b, t, h, k, generator=g)
    return q, kk, v, -torch.rand(b, t, h, generator=g), torch.rand(b, t, h, generator=g), torch.randn(b, h, k, k)


CASES = [
    ("cache_attention", _attention_args(1), "kernels.cache_attention", "cache_attention_decode"),
    ("cache_attention", _attention_args(5), "kernels.prefill_attention", "prefill_attention"),
    ("cache_append", _append_args(1, "drop"), "kernels.cache_append", "cache_append"),
    ("cache_append", _append_args(9, "evict"), "kernels.cache_append", "cache_append"),
    ("gdn_prefill", _gdn_args(7), "kernels.gdn", "gdn_chunked"),
]


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
        fn = ops.select_cuda_kernel("cache_attention", *_attention_args(1))
    assert fn is ref.cache_attention
    assert "reference (HAM_FORCE_REFERENCE is set)" in caplog.text


def test_a_missing_kernel_is_an_error_not_a_silent_switch(monkeypatch):
    monkeypatch.delenv(ops.FORCE_REFERENCE, raising=False)
    monkeypatch.setitem(ops.TRITON_KERNELS, "gdn_prefill", [(lambda *_: True, "kernels.no_such_module:gdn")])
    with pytest.raises(ops.KernelUnavailableError, match=r"cannot be imported.*HAM_FORCE_REFERENCE=1"):
        ops.select_cuda_kernel("gdn_prefill", *_gdn_args(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the ops' CUDA registrations")
@pytest.mark.parametrize(("op", "args"), [(c[0], c[1]) for c in CASES], ids=[c[2] + "-" + c[0] for c in CASES])
def test_cuda_ops_match_the_reference_on_a_gpu(op, args, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ops.FORCE_REFERENCE, raising=False)
    cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    got = getattr(torch.ops.ham, op)(*cuda)
    want = ops._REFERENCES[op](*args)
    for g, w in zip(got if isinstance(got, (tuple, list)) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4, equal_nan=True)
