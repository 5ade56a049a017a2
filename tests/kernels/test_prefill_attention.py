"""Prefill Triton kernels (routed-key compaction, sparse causal cache attention) on a CPU-only machine: parity with
``reference.cache_attention`` under the interpreter, and a Hopper (sm_90) compile without a GPU."""

from __future__ import annotations

import re

import pytest
import torch

from ham_export.ops import reference as ref

from .support import compile_for_hopper, interpreted

pa = interpreted("ham_export.kernels.prefill_attention")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402  (after the skip above)

NAN = float("nan")


def test_kernels_run_in_the_interpreter():
    assert isinstance(pa._compact_routed_kernel, InterpretedFunction)
    assert isinstance(pa._prefill_attention_kernel, InterpretedFunction)


def _route(kind: str, t: int, g: torch.Generator) -> torch.Tensor:
    if kind == "all":
        return torch.ones(t, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(t, dtype=torch.bool)
    if kind == "last":
        return torch.arange(t) == t - 1
    if kind == "first":
        return torch.arange(t) == 0
    assert kind == "random", kind
    return torch.rand(t, generator=g) < 0.5


def _inputs(c, lengths, routes, t, h=2, kd=16, vd=32, seed=0):
    """fp32 inputs with the cache tails past each length poisoned with NaN: a read past the length shows."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    q = torch.randn(b, h, t, kd, generator=g)
    k_cache = torch.randn(b, h, c, kd, generator=g)
    v_cache = torch.randn(b, h, c, vd, generator=g)
    for i, n in enumerate(lengths):
        k_cache[i, :, n:] = NAN
        v_cache[i, :, n:] = NAN
    length = torch.tensor(lengths, dtype=torch.int64)
    k = torch.randn(b, h, t, kd, generator=g)
    v = torch.randn(b, h, t, vd, generator=g)
    routed = torch.stack([_route(kind, t, g) for kind in routes])
    scale = 0.5 + torch.rand(h, generator=g)
    return q, k_cache, v_cache, length, k, v, routed, scale


def _check_close(got, want, atol=1e-5, rtol=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------- compaction

@pytest.mark.parametrize("block", [pa.COMPACT_BLOCK, 16, 8])
@pytest.mark.parametrize("t", [1, 7, 16, 50])
def test_compact_routed_matches_nonzero(t, block):
    g = torch.Generator().manual_seed(t)
    routed = torch.stack([_route(kind, t, g) for kind in ("all", "none", "random", "last", "first", "random")])
    index, count = pa._compact(routed, block)
    assert index.shape == routed.shape and index.dtype == torch.int32
    assert count.shape == (routed.shape[0],) and count.dtype == torch.int32
    for row, got, n in zip(routed, index, count.tolist(), strict=True):
        want = row.nonzero().flatten()
        assert n == len(want)
        assert got[:n].tolist() == want.tolist()
        assert (got[n:] == -1).all()


def test_compact_routed_public_and_strided():
    g = torch.Generator().manual_seed(3)
    wide = torch.rand(70, 6, generator=g) < 0.3
    routed = wide.t()[:, ::2]  # [6, 35], neither dim contiguous
    assert not routed.is_contiguous()
    index, count = pa.compact_routed(routed)
    assert count.tolist() == routed.sum(1).tolist()
    for row, got, n in zip(routed, index, count.tolist(), strict=True):
        assert got[:n].tolist() == row.nonzero().flatten().tolist()


@pytest.mark.parametrize(("routed", "message"), [
    (torch.ones(2, 3, dtype=torch.int64), "routed must be a 2-d bool tensor"),
    (torch.ones(3, dtype=torch.bool), "routed must be a 2-d bool tensor"),
    ([[True]], "routed must be a 2-d bool tensor"),
])
def test_compact_routed_bad_inputs_raise_value_error(routed, message):
    with pytest.raises(ValueError, match=message):
        pa.compact_routed(routed)


# --------------------------------------------------------------------------------------------------- attention

def _lengths(c: int) -> list[int]:
    """Full, empty, one, and a length that is not a multiple of any block (one row each)."""
    return [c, 0, min(1, c), 37 if c == 64 else c // 2 + c % 2]


def _attention_cases():
    for t in (1, 2, 17, 40):
        for c in (1, 5, 64):  # C >= 1 (the op spec)
            for route in ("all", "none", "random", "last", "mixed"):
                routes = ["all", "random", "none", "last"] if route == "mixed" else [route] * 4
                yield pytest.param(t, c, routes, id=f"T{t}-C{c}-{route}")


@pytest.mark.parametrize(("t", "c", "routes"), list(_attention_cases()))
def test_prefill_matches_reference(t, c, routes):
    args = _inputs(c, _lengths(c), routes, t, seed=t * 100 + c)
    _check_close(pa.prefill_attention(*args), ref.cache_attention(*args))


@pytest.mark.parametrize(("kd", "vd"), [(8, 8), (32, 16), (16, 40)])
@pytest.mark.parametrize("routes", [["random", "all", "last", "random"], ["none", "first", "random", "all"]])
def test_small_blocks_and_head_dims(kd, vd, routes):
    """Blocks of 16: several query blocks, cache blocks and routed-key blocks per program; a length past C is
    refused in the kernel (its row NaN, the others computed)."""
    args = _inputs(64, [64, 37, 0, 16], routes, 40, kd=kd, vd=vd, seed=kd + vd)
    want = ref.cache_attention(*args)
    _check_close(pa._prefill(*args, block_t=16, block_c=16, block_s=16, compact_block=16), want)
    q, k_cache, v_cache, _, k, v, routed, scale = args
    past = (q, k_cache, v_cache, torch.tensor([64, 37, 0, 116]), k, v, routed, scale)
    got = pa._prefill(*past, block_t=16, block_c=16, block_s=16, compact_block=16, values=False)
    assert bool(got[3].isnan().all())
    _check_close(got[:3], want[:3])


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the later query blocks do read the NaN keys
def test_unrouted_and_later_tokens_are_never_read():
    """k, v of unrouted tokens hold NaN; the first query block stops before the routed keys of later blocks."""
    q, k_cache, v_cache, length, k, v, routed, scale = _inputs(5, [5, 2], ["random", "all"], 40, seed=7)
    want = ref.cache_attention(q, k_cache, v_cache, length, k, v, routed, scale)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~routed[:, None, :].expand_as(k[..., 0])] = NAN
    v_bad[~routed[:, None, :].expand_as(v[..., 0])] = NAN
    args = (q, k_cache, v_cache, length, k_bad, v_bad, routed, scale)
    _check_close(pa._prefill(*args, block_t=16, block_c=16, block_s=16, compact_block=16), want)
    _check_close(pa.prefill_attention(*args), want)

    all_routed = torch.ones_like(routed)
    want = ref.cache_attention(q, k_cache, v_cache, length, k, v, all_routed, scale)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, 16:] = NAN  # the keys past the first query block of 16 (and past its first routed-key block)
    v_bad[:, :, 16:] = NAN
    got = pa._prefill(q, k_cache, v_cache, length, k_bad, v_bad, all_routed, scale,
                      block_t=16, block_c=16, block_s=16, compact_block=16)
    _check_close(got[:, :, :16], want[:, :, :16])


def test_strided_inputs():
    q, k_cache, v_cache, length, k, v, routed, scale = _inputs(64, [64, 37], ["random", "random"], 17, seed=11)
    q_s = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, K] memory
    k_cache_s = torch.empty(2, 2, 64, 32)[..., ::2]
    k_cache_s.copy_(k_cache)
    v_cache_s = v_cache.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    k_s = torch.empty(2, 2, 34, 16)[:, :, ::2]
    k_s.copy_(k)
    v_s = v.transpose(2, 3).contiguous().transpose(2, 3)
    routed_s = torch.zeros(2, 34, dtype=torch.bool)[:, ::2]
    routed_s.copy_(routed)
    strided = (q_s, k_cache_s, v_cache_s, length, k_s, v_s, routed_s, scale)
    assert not any(x.is_contiguous() for x in strided[:3] + strided[4:7])
    _check_close(pa.prefill_attention(*strided), ref.cache_attention(q, k_cache, v_cache, length, k, v, routed, scale))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(dtype, tol):
    args = _inputs(64, [64, 37, 0], ["random", "all", "last"], 40, seed=13)
    low = [x.to(dtype) if x.is_floating_point() else x for x in args]  # one float dtype per call (the op spec)
    want = ref.cache_attention(*[x.float() if x.dtype == dtype else x for x in low])
    got = pa.prefill_attention(*low)
    assert got.dtype == dtype
    _check_close(got.float(), want, atol=tol, rtol=tol)


def _bad(**change):
    names = ("q", "k_cache", "v_cache", "length", "k", "v", "routed", "scale")
    args = dict(zip(names, _inputs(8, [8], ["all"], 3, kd=16, vd=16), strict=True))
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "message"), [
    (dict(k_cache=torch.zeros(1, 2, 8, 8)), "input 'k_cache' has shape [1, 2, 8, 8], expected [B, H, C, K] with K ="),
    (dict(v_cache=torch.zeros(1, 3, 8, 16)), "input 'v_cache' has shape [1, 3, 8, 16], expected [B, H, C, V] with H"),
    (dict(k=torch.zeros(1, 2, 2, 16)), "input 'k' has shape [1, 2, 2, 16], expected [B, H, T, K] with T = 3 (from"),
    (dict(v=torch.zeros(1, 2, 3, 8)), "input 'v' has shape [1, 2, 3, 8], expected [B, H, T, V] with V = 16 (from"),
    (dict(length=torch.zeros(2, dtype=torch.int64)), "input 'length' has shape [2], expected [B] with B = 1 (from"),
    (dict(length=torch.zeros(1, dtype=torch.int32)), "input 'length' is int32, expected int64"),
    (dict(routed=torch.ones(1, 3, dtype=torch.int64)), "input 'routed' is int64, expected bool"),
    (dict(routed=torch.ones(1, 2, dtype=torch.bool)), "input 'routed' has shape [1, 2], expected [B, T] with T = 3"),
    (dict(routed=torch.ones(3, dtype=torch.bool)), "input 'routed' has shape [3] (rank 1), expected rank 2"),
    (dict(scale=torch.ones(3)), "input 'scale' has shape [3], expected [H] with H = 2 (from input 'q')"),
    (dict(scale=torch.ones(2, dtype=torch.int64)), "input 'scale' is int64, expected float32 like input 'q'"),
    (dict(v=torch.zeros(1, 2, 3, 16, dtype=torch.float64)), "input 'v' is float64, expected float32 like input 'q'"),
    (dict(q=torch.zeros(1, 2, 3, 16, dtype=torch.float64)), "input 'q' is float64; the float inputs must be float32"),
    (dict(q=torch.zeros(1, 2, 0, 16), k=torch.zeros(1, 2, 0, 16), v=torch.zeros(1, 2, 0, 16),
          routed=torch.ones(1, 0, dtype=torch.bool)), "input 'q' has shape [1, 2, 0, 16]: T must be at least 1"),
    (dict(k=[0.0]), "input 'k' must be a tensor, got list"),
    (dict(length=torch.zeros(1, dtype=torch.int64, device="meta")), "all inputs must be on one device, got ['cpu',"),
])
def test_bad_inputs_raise_value_error(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pa.prefill_attention(**_bad(**change))


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16"])
def test_kernels_compile_for_hopper(dtype):
    compile_for_hopper("ham_export.kernels.prefill_attention", {
        "_compact_routed_kernel": (
            dict(routed_ptr="*u8", index_ptr="*i32", count_ptr="*i32"),
            dict(BLOCK=pa.COMPACT_BLOCK)),
        "_prefill_attention_kernel": (
            dict(q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, length_ptr="*i64", k_ptr=dtype, v_ptr=dtype,
                 index_ptr="*i32", count_ptr="*i32", scale_ptr="*fp32", out_ptr=dtype),
            dict(BLOCK_T=pa.BLOCK_T, BLOCK_C=pa.BLOCK_C, BLOCK_S=pa.BLOCK_S, BLOCK_K=64, BLOCK_V=64,
                 DOT_PRECISION=pa.DOT_PRECISION, QK_FP32=False)),
    })
