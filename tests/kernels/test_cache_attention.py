"""Triton kernels on a CPU-only machine: parity under the interpreter and a Hopper (sm_90) compile without a GPU.

The kernels are imported with ``TRITON_INTERPRET=1`` set (Triton picks the interpreter when it decorates a kernel),
so every parity test below really runs the kernel code on the CPU; the compile check runs in a subprocess with the
variable unset, where the same kernels are real ``JITFunction``s.
"""

from __future__ import annotations

import re

import pytest
import torch

from ham_export.ops import reference as ref

from .support import compile_for_hopper, interpreted

ca = interpreted("ham_export.kernels.cache_attention")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402  (after the skip above)


def test_kernels_run_in_the_interpreter():
    assert isinstance(ca._cache_attention_partial_kernel, InterpretedFunction)
    assert isinstance(ca._cache_attention_combine_kernel, InterpretedFunction)


def _inputs(b, c, lengths, routed, h=2, kd=16, vd=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, kd, generator=g).to(dtype)
    k_cache = torch.randn(b, h, c, kd, generator=g).to(dtype)
    v_cache = torch.randn(b, h, c, vd, generator=g).to(dtype)
    length = torch.tensor(lengths, dtype=torch.int64)
    for i, n in enumerate(lengths):  # poison the tails: a read past the length shows as NaN
        k_cache[i, :, n:] = float("nan")
        v_cache[i, :, n:] = float("nan")
    k = torch.randn(b, h, 1, kd, generator=g).to(dtype)
    v = torch.randn(b, h, 1, vd, generator=g).to(dtype)
    routed_t = torch.tensor(routed, dtype=torch.bool)[:, None]
    scale = (0.5 + torch.rand(h, generator=g)).to(torch.float32)
    return q, k_cache, v_cache, length, k, v, routed_t, scale


def _cases():
    for c in (1, 5, 64, 130):
        lens = sorted({0, 1, min(c, 3), c - 1 if c > 1 else c, c})
        for n in lens:
            for routed in (True, False):
                yield pytest.param(1, c, [n], [routed], id=f"B1-C{c}-len{n}-routed{int(routed)}")
        yield pytest.param(2, c, [lens[-1], lens[1]], [True, False], id=f"B2-C{c}-mixed")
        yield pytest.param(2, c, [0, lens[-2]], [False, True], id=f"B2-C{c}-empty-first")


@pytest.mark.parametrize(("b", "c", "lengths", "routed"), list(_cases()))
def test_decode_matches_reference(b, c, lengths, routed):
    args = _inputs(b, c, lengths, routed)
    want = ref.cache_attention(*args)
    got = ca.cache_attention_decode(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("block_c", "max_splits", "length"), [(64, 2, 130), (64, 2, 70), (16, 3, 97), (16, 1, 100)])
def test_spans_of_several_blocks(block_c, max_splits, length):
    """Fewer spans than blocks: each program loops over several blocks, and the last span is short."""
    args = _inputs(2, 130, [length, 129], [True, False], seed=1)
    torch.testing.assert_close(ca._decode(*args, block_c=block_c, max_splits=max_splits),
                               ref.cache_attention(*args), atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_float16():
    q, k_cache, v_cache, length, k, v, routed, scale = _inputs(2, 40, [40, 17], [True, True], seed=2)
    k_strided = torch.empty(2, 2, 40, 32)[..., ::2]
    k_strided.copy_(k_cache)
    assert not k_strided.is_contiguous()
    args = (q, k_strided, v_cache, length, k, v, routed, scale)
    torch.testing.assert_close(ca.cache_attention_decode(*args), ref.cache_attention(*args), atol=1e-5, rtol=1e-5)
    half = (q.half(), k_cache.half(), v_cache.half(), length, k.half(), v.half(), routed, scale.half())
    want = ref.cache_attention(*[t.float() if t.dtype == torch.float16 else t for t in half])
    got = ca.cache_attention_decode(*half)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def _bad(**change):
    args = dict(zip(("q", "k_cache", "v_cache", "length", "k", "v", "routed", "scale"),
                    _inputs(1, 8, [8], [True]), strict=True))
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "message"), [
    (dict(q=torch.zeros(1, 2, 2, 16)), "input 'k' has shape [1, 2, 1, 16], expected [B, H, T, K] with T = 2 (from"),
    (dict(k_cache=torch.zeros(1, 2, 8, 8)), "input 'k_cache' has shape [1, 2, 8, 8], expected [B, H, C, K] with K ="),
    (dict(v_cache=torch.zeros(1, 3, 8, 16)), "input 'v_cache' has shape [1, 3, 8, 16], expected [B, H, C, V] with H"),
    (dict(length=torch.zeros(2, dtype=torch.int64)), "input 'length' has shape [2], expected [B] with B = 1 (from"),
    (dict(length=torch.zeros(1, dtype=torch.int32)), "input 'length' is int32, expected int64"),
    (dict(routed=torch.ones(1, 1, dtype=torch.int64)), "input 'routed' is int64, expected bool"),
    (dict(routed=torch.ones(1, dtype=torch.bool)), "input 'routed' has shape [1] (rank 1), expected rank 2: [B, T]"),
    (dict(scale=torch.ones(3)), "input 'scale' has shape [3], expected [H] with H = 2 (from input 'q')"),
    (dict(v=torch.zeros(1, 2, 1, 16, dtype=torch.float64)), "input 'v' is float64, expected float32 like input 'q'"),
    (dict(q=torch.zeros(1, 2, 1, 16, dtype=torch.float64)), "input 'q' is float64; the float inputs must be float32"),
    (dict(k=[0.0]), "input 'k' must be a tensor, got list"),
])
def test_bad_inputs_raise_value_error(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ca.cache_attention_decode(**_bad(**change))


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16"])
def test_kernels_compile_for_hopper(dtype):
    compile_for_hopper("ham_export.kernels.cache_attention", {
        "_cache_attention_partial_kernel": (
            dict(q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, length_ptr="*i64", scale_ptr="*fp32",
                 m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32"),
            dict(BLOCK_C=ca.BLOCK_C, BLOCK_K=64, BLOCK_V=64)),
        "_cache_attention_combine_kernel": (
            dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", q_ptr=dtype, k_ptr=dtype, v_ptr=dtype,
                 routed_ptr="*u8", scale_ptr="*fp32", length_ptr="*i64", out_ptr=dtype),
            dict(BLOCK_S=ca.MAX_SPLITS, BLOCK_K=64, BLOCK_V=64)),
    })
