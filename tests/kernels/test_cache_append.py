"""The cache-append Triton kernel against ``reference.cache_append``: equal bit for bit, under the interpreter.

Cache tails (entries at and past ``length``, scores included) hold NaN, so a read past the valid length shows, and
the comparisons are exact (NaN equal to NaN where the reference leaves a tail as it came).
"""

from __future__ import annotations

import re

import pytest
import torch

from ham_export.ops import reference as ref
from ham_export.ops.spec import POLICIES

from .support import compile_for_hopper, interpreted

ka = interpreted("ham_export.kernels.cache_append")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402  (after the skip above)


def test_kernel_runs_in_the_interpreter():
    assert isinstance(ka._cache_append_kernel, InterpretedFunction)


def _state(b, c, t, lengths, routed, h=2, kd=8, vd=4, dtype=torch.float32, seed=0, score_cache=None, score=None):
    """A cache with NaN tails and T new tokens; ``routed`` is [B, T] of 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(b, h, c, kd, generator=g).to(dtype)
    v_cache = torch.randn(b, h, c, vd, generator=g).to(dtype)
    sc = torch.rand(b, c, generator=g) * 2 if score_cache is None else torch.tensor(score_cache, dtype=torch.float32)
    sc = sc.to(dtype)
    length = torch.tensor(lengths, dtype=torch.int64)
    for i, n in enumerate(lengths):
        k_cache[i, :, n:] = float("nan")
        v_cache[i, :, n:] = float("nan")
        sc[i, n:] = float("nan")
    k = torch.randn(b, h, t, kd, generator=g).to(dtype)
    v = torch.randn(b, h, t, vd, generator=g).to(dtype)
    s = (torch.rand(b, t, generator=g) * 2 if score is None else torch.tensor(score, dtype=torch.float32)).to(dtype)
    return k_cache, v_cache, sc, length, k, v, s, torch.tensor(routed, dtype=torch.bool)


def _assert_exact(got, want):
    names = ("k_cache", "v_cache", "score_cache", "length", "overflow")
    for name, a, w in zip(names, got, want, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape, name
        torch.testing.assert_close(a, w, atol=0, rtol=0, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def _run_in_place(args, policy, **blocks):
    """The in-place kernel on copies of the cache; returns what it left there and the overflow."""
    k_cache, v_cache, sc, length = (x.clone() for x in args[:4])
    overflow = ka._append(k_cache, v_cache, sc, length, *args[4:], policy, **blocks)
    return k_cache, v_cache, sc, length, overflow


def _patterns(t):
    """Route patterns for the rows of one call: all, none, alternating, all but the first."""
    return [[1] * t, [0] * t, [(i + 1) % 2 for i in range(t)], [0] + [1] * (t - 1)]


def _cases():
    for c in (1, 5, 64, 130):
        lengths = sorted({0, 1, min(c, 3), min(c, 70), max(c - 1, 0), c})
        for t in (1, 3, 7):
            pats = _patterns(t)
            routed = [pats[i % len(pats)] for i in range(len(lengths))]
            routed[-2] = routed[-1] = pats[0]  # C - 1 and full: every token routed, all or all but one overflow
            for policy in POLICIES:
                yield pytest.param(c, t, lengths, routed, policy, id=f"C{c}-T{t}-{policy}")


@pytest.mark.parametrize(("c", "t", "lengths", "routed", "policy"), list(_cases()))
def test_rows_in_different_states_match_reference(c, t, lengths, routed, policy):
    """One call, one row per length (empty, 1, short, a non-multiple of a block, C - 1, full), mixed routes."""
    args = _state(len(lengths), c, t, lengths, routed, seed=c + t)
    want = ref.cache_append(*args, policy)
    _assert_exact(_run_in_place(args, policy), want)
    if c > 1:
        assert int(want[4].max()) >= 1  # the full row overflows at least once


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("t", [3, 7])
def test_several_tokens_overflow(policy, t):
    """Rows that fill up within the call: some tokens fit, the rest overflow (several per row)."""
    lengths = [3, 4, 5, 2]
    args = _state(4, 5, t, lengths, [[1] * t] * 4, seed=t)
    want = ref.cache_append(*args, policy)
    assert want[4].tolist() == [max(n + t - 5, 0) for n in lengths]
    _assert_exact(_run_in_place(args, policy), want)


@pytest.mark.parametrize(("block_t", "block_c"), [(2, 4), (4, 16), (1, 1)])
def test_blocks_smaller_than_the_call(block_t, block_c):
    """Several token blocks (the prefix sum carried over) and several argmin blocks (the first lowest kept)."""
    t, c = 7, 130
    lengths = [128, 130, 0]
    routed = [[1, 0, 1, 1, 0, 1, 1], [1] * t, [0, 1, 1, 0, 0, 1, 1]]
    score_cache = torch.rand(3, c, generator=torch.Generator().manual_seed(3)) + 0.5
    score_cache[1, [17, 90, 129]] = 0.25  # ties for the lowest entry across blocks
    for policy in POLICIES:
        args = _state(3, c, t, lengths, routed, seed=4, score_cache=score_cache.tolist())
        _assert_exact(_run_in_place(args, policy, block_t=block_t, block_c=block_c), ref.cache_append(*args, policy))


def test_evict_ties_and_equal_score():
    """Ties: the first lowest slot goes; a score equal to the lowest replaces nothing (strictly higher only)."""
    args = _state(2, 4, 1, [4, 4], [[1], [1]], score_cache=[[0.5, 0.2, 0.9, 0.2], [0.3, 0.1, 0.1, 0.4]],
                  score=[[0.6], [0.1]])
    want = ref.cache_append(*args, "evict")
    got = _run_in_place(args, "evict")
    _assert_exact(got, want)
    assert got[2][0].tolist() == pytest.approx([0.5, 0.6, 0.9, 0.2])
    torch.testing.assert_close(got[0][0, :, 1], args[4][0, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(got[0][1], args[0][1], atol=0, rtol=0)  # row 1 unchanged
    assert got[3].tolist() == [4, 4] and got[4].tolist() == [1, 1]


def test_evict_score_lower_than_every_entry():
    args = _state(1, 3, 1, [3], [[1]], score_cache=[[0.5, 0.7, 0.6]], score=[[0.1]])
    got = _run_in_place(args, "evict")
    _assert_exact(got, ref.cache_append(*args, "evict"))
    for before, after in zip(args[:4], got[:4], strict=True):
        torch.testing.assert_close(after, before, atol=0, rtol=0, equal_nan=True)
    assert got[4].tolist() == [1]


def test_evict_sees_earlier_tokens_of_the_same_call():
    """Token 0 fits in the last slot; token 1 evicts it (lowest); token 2 evicts the old entry."""
    args = _state(1, 2, 3, [1], [[1, 1, 1]], score_cache=[[0.5, 0.0]], score=[[0.1, 0.9, 0.95]])
    got = _run_in_place(args, "evict")
    _assert_exact(got, ref.cache_append(*args, "evict"))
    assert got[2].tolist() == [[0.949999988079071, 0.8999999761581421]]
    torch.testing.assert_close(got[1][0, :, 0], args[5][0, :, 2], atol=0, rtol=0)
    torch.testing.assert_close(got[1][0, :, 1], args[5][0, :, 1], atol=0, rtol=0)
    assert got[3].tolist() == [2] and got[4].tolist() == [2]


def test_nan_in_a_full_row_replaces_nothing():
    """torch.argmin takes a NaN as the lowest entry and no score is above it: the reference keeps the row."""
    args = _state(1, 3, 2, [3], [[1, 1]], score_cache=[[0.5, 0.2, 0.6]], score=[[0.9, float("nan")]])
    args[2][0, 2] = float("nan")
    _assert_exact(_run_in_place(args, "evict"), ref.cache_append(*args, "evict"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_low_precision_is_moved_exactly(dtype, policy):
    args = _state(3, 5, 3, [5, 4, 0], [[1, 1, 1], [0, 1, 1], [1, 0, 1]], dtype=dtype, seed=5)
    _assert_exact(_run_in_place(args, policy), ref.cache_append(*args, policy))


def test_strided_inputs():
    b, h, c, t, kd = 2, 2, 6, 3, 8
    args = list(_state(b, c, t, [5, 6], [[1, 1, 0], [1, 0, 1]], seed=6))
    k_cache = torch.full((b, c, h, 2 * kd), float("nan")).permute(0, 2, 1, 3)[..., ::2]  # [B, H, C, K], strided
    k_cache.copy_(args[0])
    sc = torch.full((c, b), float("nan")).t()
    sc.copy_(args[2])
    k = torch.empty(b, h, kd, t).transpose(2, 3)
    k.copy_(args[4])
    routed = torch.zeros(t, b, dtype=torch.bool).t()
    routed.copy_(args[7])
    score = torch.empty(t, b).t()
    score.copy_(args[6])
    args[0], args[2], args[4], args[6], args[7] = k_cache, sc, k, score, routed
    assert not any(x.is_contiguous() for x in (k_cache, sc, k, routed, score))
    for policy in POLICIES:
        _assert_exact(_run_in_place(args, policy), ref.cache_append(*args, policy))


def test_functional_form_leaves_its_inputs():
    args = _state(2, 5, 3, [4, 5], [[1, 1, 1], [1, 0, 1]], seed=7)
    before = [x.clone() for x in args]
    got = ka.cache_append(*args, "evict")
    _assert_exact(got, ref.cache_append(*args, "evict"))
    for a, w in zip(args, before, strict=True):
        torch.testing.assert_close(a, w, atol=0, rtol=0, equal_nan=True)


def test_in_place_form_returns_overflow_and_updates_the_cache():
    args = _state(1, 2, 3, [1], [[1, 1, 1]], seed=8)
    want = ref.cache_append(*args, "drop")
    overflow = ka.cache_append_(*args, "drop")
    _assert_exact((*args[:4], overflow), want)


def _bad(**change):
    names = ("k_cache", "v_cache", "score_cache", "length", "k", "v", "score", "routed")
    args = dict(zip(names, _state(1, 4, 2, [2], [[1, 1]]), strict=True))
    args["policy"] = "drop"
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "message"), [
    (dict(policy="error"), "attribute 'policy' is 'error'; it must be 'drop' or 'evict'"),
    (dict(k_cache=torch.zeros(1, 2, 4)), "input 'k_cache' has shape [1, 2, 4] (rank 3), expected rank 4: [B, H, C, K]"),
    (dict(v_cache=torch.zeros(1, 2, 5, 4)), "input 'v_cache' has shape [1, 2, 5, 4], expected [B, H, C, V] with C ="),
    (dict(score_cache=torch.zeros(1, 3)), "input 'score_cache' has shape [1, 3], expected [B, C] with C = 4 (from"),
    (dict(length=torch.zeros(2, dtype=torch.int64)), "input 'length' has shape [2], expected [B] with B = 1 (from"),
    (dict(length=torch.zeros(1, dtype=torch.int32)), "input 'length' is int32, expected int64"),
    (dict(k=torch.zeros(1, 2, 2, 4)), "input 'k' has shape [1, 2, 2, 4], expected [B, H, T, K] with K = 8 (from"),
    (dict(v=torch.zeros(1, 2, 3, 4)), "input 'v' has shape [1, 2, 3, 4], expected [B, H, T, V] with T = 2 (from"),
    (dict(score=torch.zeros(1, 3)), "input 'score' has shape [1, 3], expected [B, T] with T = 2 (from input 'k')"),
    (dict(score=torch.zeros(1, 2, dtype=torch.float16)), "input 'score' is float16, expected float32 like input"),
    (dict(routed=torch.ones(1, 2, dtype=torch.uint8)), "input 'routed' is uint8, expected bool"),
    (dict(routed=torch.ones(1, 3, dtype=torch.bool)), "input 'routed' has shape [1, 3], expected [B, T] with T = 2"),
    (dict(v=torch.zeros(1, 2, 2, 4, dtype=torch.float16)), "input 'v' is float16, expected float32 like input"),
    (dict(k_cache=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), "input 'k_cache' is float64; the float inputs must"),
    (dict(score=[0.0, 1.0]), "input 'score' must be a tensor, got list"),
])
def test_bad_inputs_raise_value_error(change, message):
    args = _bad(**change)
    before = args["k_cache"].clone() if isinstance(args["k_cache"], torch.Tensor) else None
    with pytest.raises(ValueError, match=re.escape(message)):
        ka.cache_append_(**args)
    if before is not None:
        torch.testing.assert_close(args["k_cache"], before, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize(("dtype", "evict", "block_t"), [("*fp32", False, ka.BLOCK_T), ("*fp32", True, 1),
                                                        ("*bf16", False, 1), ("*bf16", True, ka.BLOCK_T)])
def test_kernel_compiles_for_hopper(dtype, evict, block_t):
    """Both policies, prefill blocks and the one-token block of decode."""
    compile_for_hopper("ham_export.kernels.cache_append", {
        "_cache_append_kernel": (
            dict(k_cache_ptr=dtype, v_cache_ptr=dtype, score_cache_ptr=dtype, length_ptr="*i64", k_ptr=dtype,
                 v_ptr=dtype, score_ptr=dtype, routed_ptr="*u8", new_length_ptr="*i64", overflow_ptr="*i64"),
            dict(EVICT=evict, BLOCK_T=block_t, BLOCK_C=ka.BLOCK_C, BLOCK_K=128, BLOCK_V=128, INVALID=-1)),
    })
