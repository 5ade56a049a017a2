"""The reference ops against independent formulations and their own contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ham_export.ops import reference as ref
from ham_export.ops.spec import POLICIES


def gdn_inputs(b, t, h, dk, dv, seed=0, state_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = ref.l2_normalize(torch.randn(b, t, h, dk, generator=gen))
    k = ref.l2_normalize(torch.randn(b, t, h, dk, generator=gen))
    v = torch.randn(b, t, h, dv, generator=gen)
    g = -torch.rand(b, t, h, generator=gen) * 0.7
    beta = torch.rand(b, t, h, generator=gen)
    state = state_scale * torch.randn(b, h, dk, dv, generator=gen)
    return q, k, v, g, beta, state


def delta_rule_numpy(q, k, v, g, beta, state):
    """The textbook delta rule in float64: S_t = alpha (I - beta k k^T) S_{t-1} + beta k v^T, per head."""
    q, k, v, g, beta, s = (x.double().numpy() for x in (q, k, v, g, beta, state))
    b, t, h, dk = k.shape
    outs = np.zeros(v.shape)
    preds = np.zeros(v.shape)
    s = s.copy()
    for bi in range(b):
        for hi in range(h):
            S = s[bi, hi]
            for ti in range(t):
                a, bt = math.exp(g[bi, ti, hi]), beta[bi, ti, hi]
                kt, vt = k[bi, ti, hi][:, None], v[bi, ti, hi][None, :]
                preds[bi, ti, hi] = a * (kt.T @ S)[0]
                S = a * (np.eye(dk) - bt * kt @ kt.T) @ S + bt * kt @ vt
                outs[bi, ti, hi] = (q[bi, ti, hi][None, :] @ S)[0] / math.sqrt(dk)
            s[bi, hi] = S
    return torch.from_numpy(outs), torch.from_numpy(preds), torch.from_numpy(s)


def test_gdn_recurrent_matches_textbook_delta_rule():
    args = gdn_inputs(2, 19, 3, 8, 5)
    o, vhat, state = ref.gdn_recurrent(*args)
    o64, vhat64, state64 = delta_rule_numpy(*args)
    torch.testing.assert_close(o.double(), o64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vhat.double(), vhat64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), state64, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 70), chunk=st.sampled_from([1, 4, 16, 64]), h=st.integers(1, 3), seed=st.integers(0, 99),
       state_scale=st.sampled_from([0.0, 1.0]))
def test_gdn_chunked_matches_recurrent(t, chunk, h, seed, state_scale):
    args = gdn_inputs(2, t, h, 8, 6, seed, state_scale)
    expected = ref.gdn_recurrent(*args)
    got = ref.gdn_chunked(*args, chunk_size=chunk)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5)


def test_gdn_chunked_continues_from_its_own_state():
    q, k, v, g, beta, state = gdn_inputs(1, 50, 2, 8, 8)
    whole = ref.gdn_chunked(q, k, v, g, beta, state, chunk_size=16)
    first = ref.gdn_chunked(q[:, :23], k[:, :23], v[:, :23], g[:, :23], beta[:, :23], state, chunk_size=16)
    second = ref.gdn_chunked(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], beta[:, 23:], first[2], chunk_size=16)
    torch.testing.assert_close(torch.cat([first[0], second[0]], 1), whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[2], whole[2], atol=1e-5, rtol=1e-5)


def test_surprise_range_and_fixed_points():
    v = torch.randn(5, 7)
    torch.testing.assert_close(ref.surprise(torch.zeros(5, 7), v), torch.ones(5))  # empty state: e = 1
    torch.testing.assert_close(ref.surprise(3 * v, v), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.surprise(-v, v), torch.full((5,), 2.0), atol=1e-6, rtol=0)
    e = ref.surprise(torch.randn(1000, 4), torch.randn(1000, 4))
    assert bool(((e >= 0) & (e <= 2)).all())


def test_causal_conv_continues_across_calls():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 6, generator=gen)
    weight = torch.randn(6, 4, generator=gen)
    zeros = torch.zeros(2, 3, 6)
    whole, tail = ref.causal_conv(x, zeros, weight)
    a, tail_a = ref.causal_conv(x[:, :5], zeros, weight)
    b, tail_b = ref.causal_conv(x[:, 5:], tail_a, weight)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)
    torch.testing.assert_close(tail_b, tail)
    torch.testing.assert_close(tail, x[:, -3:])
    # Row t depends on rows t-3..t only, with weight[:, 3] on the newest.
    torch.testing.assert_close(whole[:, 4], (x[:, 1:5] * weight.T).sum(1))


def test_causal_conv_width_one_has_no_tail():
    x = torch.randn(1, 4, 3)
    y, tail = ref.causal_conv(x, torch.zeros(1, 0, 3), torch.full((3, 1), 2.0))
    torch.testing.assert_close(y, 2 * x)
    assert tail.shape == (1, 0, 3)


def nan_cache(b, h, c, d):
    return torch.full((b, h, c, d), float("nan"))


def append_case(b=2, h=2, c=6, t=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, 3, generator=gen)
    v = torch.randn(b, h, t, 3, generator=gen)
    score = torch.rand(b, t, generator=gen)
    caches = nan_cache(b, h, c, 3), nan_cache(b, h, c, 3), torch.full((b, c), float("nan"))
    return caches, k, v, score


@pytest.mark.parametrize("policy", POLICIES)
def test_cache_append_compacts_in_order_and_keeps_the_rest(policy):
    (k_cache, v_cache, s_cache), k, v, score = append_case()
    routed = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    length = torch.tensor([1, 0])
    k_cache[0, :, 0], s_cache[0, 0] = 7.0, 0.5
    k_new, v_new, s_new, new_length, overflow = ref.cache_append(k_cache, v_cache, s_cache, length, k, v, score,
                                                                 routed, policy)
    assert new_length.tolist() == [4, 1] and overflow.tolist() == [0, 0]
    torch.testing.assert_close(k_new[0, :, 1:4], k[0, :, [0, 2, 3]])
    torch.testing.assert_close(v_new[1, :, 0:1], v[1, :, [4]])
    torch.testing.assert_close(s_new[0, 1:4], score[0, [0, 2, 3]])
    assert bool((k_new[0, :, 0] == 7.0).all()) and float(s_new[0, 0]) == 0.5  # existing entries untouched
    assert bool(k_new[0, :, 4:].isnan().all()) and bool(k_new[1, :, 1:].isnan().all())  # no write past length


def test_cache_append_drop_keeps_the_first_that_fit():
    (k_cache, v_cache, s_cache), k, v, score = append_case(b=1, c=3, t=5)
    routed = torch.tensor([[True, True, False, True, True]])
    k_new, _, _, length, overflow = ref.cache_append(k_cache, v_cache, s_cache, torch.tensor([1]), k, v,
                                                         score, routed, "drop")
    assert length.tolist() == [3] and overflow.tolist() == [2]
    torch.testing.assert_close(k_new[0, :, 1:3], k[0, :, [0, 1]])


def grid_key(score: torch.Tensor) -> int:
    return math.floor(float(score) * 1024 + 0.5)


def evict_oracle(k_cache, v_cache, s_cache, length, k, v, score, routed):
    """Token by token: append while there is room, then replace the first entry of lowest key (the score rounded
    to 1/1024) if beaten."""
    k_cache, v_cache, s_cache, length = k_cache.clone(), v_cache.clone(), s_cache.clone(), length.clone()
    overflow = torch.zeros_like(length)
    capacity = k_cache.shape[2]
    for b in range(k.shape[0]):
        for t in range(k.shape[2]):
            if not routed[b, t]:
                continue
            if length[b] < capacity:
                j = int(length[b])
                length[b] += 1
            else:
                overflow[b] += 1
                j = min(range(capacity), key=lambda i, b=b: (grid_key(s_cache[b, i]), i))
                if not grid_key(score[b, t]) > grid_key(s_cache[b, j]):
                    continue
            k_cache[b, :, j], v_cache[b, :, j], s_cache[b, j] = k[b, :, t], v[b, :, t], score[b, t]
    return k_cache, v_cache, s_cache, length, overflow


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 6), t=st.integers(1, 7), seed=st.integers(0, 999))
def test_cache_append_evict_matches_token_by_token_oracle(c, t, seed):
    (k_cache, v_cache, s_cache), k, v, score = append_case(b=2, c=c, t=t, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    length = torch.randint(0, c + 1, (2,), generator=gen)
    for b in range(2):
        n = int(length[b])
        k_cache[b, :, :n] = torch.randn(2, n, 3, generator=gen)
        v_cache[b, :, :n] = torch.randn(2, n, 3, generator=gen)
        s_cache[b, :n] = torch.rand(n, generator=gen)
    routed = torch.rand(2, t, generator=gen) > 0.3
    got = ref.cache_append(k_cache, v_cache, s_cache, length, k, v, score, routed, "evict")
    expected = evict_oracle(k_cache, v_cache, s_cache, length, k, v, score, routed)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True)


def naive_attention(q, keys, values, scale):
    """Softmax over the given keys, one query, one head; zero when there is none."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1])
    return torch.softmax(scale * (keys @ q), 0) @ values


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 9), t=st.integers(1, 4), seed=st.integers(0, 99))
def test_cache_attention_sees_valid_entries_and_routed_new_tokens(c, t, seed):
    gen = torch.Generator().manual_seed(seed)
    b, h = 2, 2
    q, k = torch.randn(b, h, t, 4, generator=gen), torch.randn(b, h, t, 4, generator=gen)
    v = torch.randn(b, h, t, 3, generator=gen)
    k_cache, v_cache = nan_cache(b, h, c, 4), nan_cache(b, h, c, 3)
    length = torch.randint(0, c + 1, (b,), generator=gen)
    routed = torch.rand(b, t, generator=gen) > 0.5
    fill = int(length.max())
    k_cache[:, :, :fill] = torch.randn(b, h, fill, 4, generator=gen)
    v_cache[:, :, :fill] = torch.randn(b, h, fill, 3, generator=gen)
    scale = torch.tensor([2.0, 5.0])
    out = ref.cache_attention(q, k_cache, v_cache, length, k, v, routed, scale)
    assert bool(out.isfinite().all())
    for bi in range(b):
        n = int(length[bi])
        for hi in range(h):
            for ti in range(t):
                seen = [s for s in range(ti + 1) if routed[bi, s]]
                keys = torch.cat([k_cache[bi, hi, :n], k[bi, hi, seen]])
                values = torch.cat([v_cache[bi, hi, :n], v[bi, hi, seen]])
                torch.testing.assert_close(out[bi, hi, ti], naive_attention(q[bi, hi, ti], keys, values, scale[hi]),
                                           atol=1e-6, rtol=1e-5)


def test_routed_attention_all_keys_equals_sdpa():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=gen) for _ in range(3))
    scale = torch.tensor([1.0, 4.0, 9.0])
    causal = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 10, 10)
    got = ref.routed_attention(q, k, v, causal, scale)
    expected = F.scaled_dot_product_attention(q * scale[:, None, None], k, v, is_causal=True, scale=1.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_routed_attention_straight_through_has_hard_value_and_router_gradient():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen) for _ in range(3))
    p = torch.rand(1, 6, generator=gen).requires_grad_()
    routed = p.detach() >= 0.5
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None]
    hard = ref.routed_attention(q, k, v, causal & routed[:, None, :], torch.ones(2))
    soft = ref.routed_attention(q, k, v, causal, torch.ones(2), routed.float() + p - p.detach())
    torch.testing.assert_close(soft, hard, atol=1e-6, rtol=1e-6)
    soft.sum().backward()
    assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_eviction_near_ties_are_found():
    """A decision a change of the scores by the margin (1e-4: 0.1 on the grid of 1/1024) could change is a near
    tie; a robust one is not. Scores in grid units (n / 1024); key lines lie at n + 0.5."""
    cases = [  # (cache scores, new score, near tie)
        ([512, 300, 100], 600, False),  # evicts slot 2, every key far from a line
        ([512, 300, 100], 50, False),  # stays out
        ([0, 0, 0], 2.0 ** -14, False),  # saturated (2^-24 as a score): an exact tie, the lowest slot decides
        ([512, 100.45, 100], 600, True),  # slot 1 (key 100, first of two) may round up: then slot 2 goes
        ([512, 300, 100.45], 600, False),  # slot 2 may round up, and stays the lowest
        ([512, 300, 100], 100.55, True),  # the new key (101) may round down to the lowest: evict or not
        ([512, 204.8, 300], 204.8001, False),  # 0.2 and 0.2 + 1e-7: one key, robustly; stays out
    ]
    for scores, new, near in cases:
        got = ref.evict_near_ties(torch.tensor([scores]) / 1024, torch.tensor([3]), torch.tensor([[new]]) / 1024,
                                  torch.tensor([[True]]), 1e-4)
        assert got.tolist() == [near], (scores, new)
    # Room left: no eviction, no near tie, whatever the scores.
    got = ref.evict_near_ties(torch.tensor([[100.5, 0.0, 0.0]]) / 1024, torch.tensor([1]),
                              torch.tensor([[100.5]]) / 1024, torch.tensor([[True]]), 1e-4)
    assert got.tolist() == [False]
