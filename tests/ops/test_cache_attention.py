"""CacheAttention: every implementation against the reference, on every case of ``inputs.attention_cases``.

Tolerance policy: float32 inputs within 1e-5 (absolute and relative) of the float32 reference; float16 and bfloat16
inputs against the float32 reference of the same (rounded) inputs, within 3e-3 and 3e-2: the implementation's own
rounding of its output, fp32 arithmetic inside. Outputs are finite: the NaN cache tails were never read.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ham_export.ops import reference as ref

from .conftest import available, takes
from .implementations import IMPLEMENTATIONS
from .inputs import attention, attention_cases

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
CASES = attention_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS["cache_attention"], ids=str)
def test_matches_the_reference(impl, case):
    available(impl)
    takes(impl, case)
    [got] = impl.run(case.inputs)
    want = ref.cache_attention(*[x.float() if x.is_floating_point() else x for x in case.inputs])
    assert got.dtype == case.dtype and got.shape == want.shape
    assert bool(torch.isfinite(got).all()), "NaN or inf: a cache entry past its length was read"
    tol = TOL[case.dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    if case.name == "nothing-routed":  # an empty cache and nothing routed: no key, the output is 0
        assert bool((got[0] == 0).all()) and not bool((got[1] == 0).all())


HEADS_AND_WIDTHS = [(1, 4, 3), (2, 1, 9), (3, 8, 8)]  # (H, K, V): few, so that compiled forms are reused


@pytest.mark.parametrize("impl", IMPLEMENTATIONS["cache_attention"], ids=str)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), t=st.integers(1, 6), c=st.integers(1, 9), hkv=st.sampled_from(HEADS_AND_WIDTHS),
       routed_p=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_random_shapes(impl, b, t, c, hkv, routed_p, seed):
    available(impl)
    h, k, v = hkv
    inputs = attention(b, h, t, c, k, v, routed_p=routed_p, seed=seed)
    if impl.accepts({"T": t}) is not None:
        return
    [got] = impl.run(inputs)
    torch.testing.assert_close(got, ref.cache_attention(*inputs), atol=1e-5, rtol=1e-5)
