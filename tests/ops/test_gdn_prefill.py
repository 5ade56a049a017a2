"""GdnPrefill: every implementation against the token-by-token delta rule (``reference.gdn_recurrent``), on every
case of ``inputs.gdn_cases``; the chunked reference (``gdn_chunked``, the op's own reference) is one of them.

Tolerance policy: float32 within 2e-5 of the recurrent reference in float32 (the chunked forms within 1e-4: the
triangular solve reorders the sums); float16 and bfloat16 inputs against the float32 recurrence of the same
inputs, within 3e-3 and 3e-2.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ham_export.ops import reference as ref

from .conftest import available, takes
from .implementations import IMPLEMENTATIONS
from .inputs import gdn, gdn_cases

CHUNKED = ("reference", "torch-op", "triton")  # chunked forms: sums in another order
CASES = gdn_cases()


def tolerance(impl, dtype) -> float:
    if dtype != torch.float32:
        return {torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    return 1e-4 if impl.name in CHUNKED else 2e-5


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS["gdn_prefill"], ids=str)
def test_matches_the_recurrence(impl, case):
    available(impl)
    takes(impl, case)
    got = impl.run(case.inputs)
    want = ref.gdn_recurrent(*[x.float() for x in case.inputs])
    tol = tolerance(impl, case.dtype)
    for name, g, w in zip(("o", "vhat", "state_out"), got, want, strict=True):
        assert g.dtype == case.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS["gdn_prefill"], ids=str)
def test_continues_from_its_state(impl):
    """A prompt in two calls, the second from the first's state, equals the prompt in one call."""
    available(impl)
    q, k, v, g, beta, state = gdn(2, 12, 2, 8, 8, seed=7)
    whole = impl.run([q, k, v, g, beta, state])
    first = impl.run([x[:, :5] for x in (q, k, v, g, beta)] + [state])
    second = impl.run([x[:, 5:] for x in (q, k, v, g, beta)] + [first[2]])
    tol = tolerance(impl, torch.float32)
    torch.testing.assert_close(torch.cat([first[0], second[0]], 1), whole[0], atol=tol, rtol=tol)
    torch.testing.assert_close(second[2], whole[2], atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS["gdn_prefill"], ids=str)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), t=st.sampled_from([1, 2, 7, 20, 33, 70]), hkv=st.sampled_from([(1, 4, 3), (2, 9, 1)]),
       seed=st.integers(0, 2**16))
def test_random_shapes(impl, b, t, hkv, seed):
    available(impl)
    h, k, v = hkv
    inputs = gdn(b, t, h, k, v, seed=seed)
    tol = tolerance(impl, torch.float32)
    for g, w in zip(impl.run(inputs), ref.gdn_recurrent(*inputs), strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
