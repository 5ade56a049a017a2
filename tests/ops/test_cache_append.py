"""CacheAppend: every implementation (functional and in place) equal to the reference bit for bit, on every case of
``inputs.append_cases``: both policies, overflow, evict ties (exact, and a few ulps apart), float16 and bfloat16.

The op only moves data and counts, so the comparison is exact, NaN included: the entries past the new length come
back as they came (NaN), whatever the implementation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ham_export.ops import reference as ref

from .conftest import available, takes
from .implementations import IMPLEMENTATIONS
from .inputs import NEAR_TIES_AFTER, append, append_cases

NAMES = ("k_cache", "v_cache", "score_cache", "length", "overflow")
CASES = append_cases()


def assert_exact(got, want) -> None:
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS["cache_append"], ids=str)
def test_equals_the_reference(impl, case):
    available(impl)
    takes(impl, case)
    before = [x.clone() for x in case.inputs]
    got = impl.run(case.inputs, case.attributes)
    want = ref.cache_append(*before, case.attributes["policy"])
    assert_exact(got, want)
    for x, b in zip(case.inputs, before, strict=True):  # run() leaves the caller's tensors alone
        torch.testing.assert_close(x, b, atol=0, rtol=0, equal_nan=True)
    if case.name.endswith("-overflow"):
        assert got[3].tolist() == [4, 4] and got[4].tolist() == [5, 6]
        if case.attributes["policy"] == "evict":  # the high scorers got in
            assert bool((got[2][0] == 0.95).any()) and bool((got[2][1] == 3.0).any())
    if case.name == "evict-near-ties":  # scores a few ulps apart share a key: the lowest slot goes, ties stay out
        assert torch.equal(got[2], torch.tensor(NEAR_TIES_AFTER["evict"])) and got[4].tolist() == [3, 3]


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS["cache_append"] if i.in_place], ids=str)
@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_in_place_writes_only_the_new_entries(impl, policy):
    """The caches are written where they lie, and nothing but the slots that receive a token changes."""
    available(impl)
    inputs = append(2, 2, 3, 6, lengths=[1, 5], routed_p=1.0, seed=11)
    caches = inputs[:4]
    pointers = [x.data_ptr() for x in caches]
    before = [x.clone() for x in caches]
    want = ref.cache_append(*[x.clone() for x in inputs], policy)
    overflow = impl.write(inputs, {"policy": policy})
    assert [x.data_ptr() for x in caches] == pointers
    assert_exact([*caches, overflow], want)
    # row 0: 3 tokens land at slots 1..3; row 1: one lands at 5, two overflow (drop: nothing else changes)
    changed = (caches[0] != before[0]) & ~(caches[0].isnan() & before[0].isnan())
    slots = changed.any(-1).any(1)  # [B, C]
    assert slots[0].tolist() == [False, True, True, True, False, False]
    if policy == "drop":
        assert slots[1].tolist() == [False] * 5 + [True]


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS["cache_append"] if i.in_place], ids=str)
def test_a_decode_loop_in_place_fills_and_overflows(impl):
    """Fourteen one-token steps into a cache of 5, in place, equal to the reference step by step."""
    available(impl)
    state = append(2, 2, 1, 5, k=4, v=4, lengths=[0, 3], seed=12)
    caches = state[:4]
    reference = [x.clone() for x in caches]
    for step in range(14):
        new = append(2, 2, 1, 5, k=4, v=4, lengths=[0, 0], routed_p=0.7, seed=100 + step)[4:]
        overflow = impl.write([*caches, *new], {"policy": "evict"})
        *reference, want_overflow = ref.cache_append(*reference, *new, "evict")
        assert_exact([*caches, overflow], [*reference, want_overflow])
    assert caches[3].tolist() == [5, 5]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS["cache_append"], ids=str)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), t=st.integers(1, 7), c=st.integers(1, 6), hkv=st.sampled_from([(1, 4, 3), (2, 1, 5)]),
       routed_p=st.sampled_from([0.3, 0.8, 1.0]), ties=st.booleans(), policy=st.sampled_from(["drop", "evict"]),
       seed=st.integers(0, 2**16))
def test_random_shapes(impl, b, t, c, hkv, routed_p, ties, policy, seed):
    available(impl)
    h, k, v = hkv
    t = t if impl.accepts({"T": t}) is None else 1  # a decode form takes one new token
    inputs = append(b, h, t, c, k, v, routed_p=routed_p, seed=seed, ties=ties)
    assert_exact(impl.run(inputs, {"policy": policy}), ref.cache_append(*inputs, policy))
