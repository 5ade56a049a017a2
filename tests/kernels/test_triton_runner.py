"""The whole model on the Triton kernels (prefill and in-place decode) equals the eager reference, step by step.

Under the interpreter on the CPU: logits, scores, exact route decisions, GDN state, conv tails, lengths, overflow
counts and the valid cache entries are compared at every step by ``ham_export.check.compare``, at "store every
token", "store none" and a mid threshold, with a capacity the prompt and steps overflow, for both policies and
both routers.
"""

from __future__ import annotations

import pytest
import torch

from ham_export.check import compare, default_prompts
from ham_export.errors import InputError
from ham_export.runners import EagerRunner, TritonRunner

from ..conftest import make_small_model
from .support import interpreted

interpreted("kernels.decode_step")  # skips without Triton; the kernels below run under the interpreter


@pytest.mark.parametrize("router", ["cosine", "learned"])
@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_model_on_the_kernels_equals_eager(router, policy):
    model = make_small_model(router)
    prompts = default_prompts()[:2, :12]
    with torch.no_grad():
        _, routes = model(prompts)
    mid = float(torch.cat([r.score.flatten() for r in routes]).median())
    # Capacity 10 < prompt (12) + steps (6): the policy applies.
    eager, triton = EagerRunner(model, 10, policy), TritonRunner(model, 10, policy, device="cpu")
    results = compare(eager, triton, prompts, [-1.0, 3.0, mid], 6, 1e-5, 1e-5, 1e-4)
    for r in results:
        assert r.passed, r.failures
        assert r.far_flips == 0
    assert results[0].kv_fraction == 1.0 and results[1].kv_fraction == 0.0


def test_decode_updates_the_state_in_place():
    model = make_small_model()
    runner = TritonRunner(model, 16, "drop", device="cpu")
    tau = torch.full((model.cfg.n_layers,), -1.0)
    _, state = runner.prefill(torch.tensor([[1, 2, 3]]), tau)
    before = [(s.ssm.data_ptr(), s.k_cache.data_ptr(), s.length.data_ptr()) for s in state]
    _, new_state = runner.step(torch.tensor([4]), tau, state)
    assert [(s.ssm.data_ptr(), s.k_cache.data_ptr(), s.length.data_ptr()) for s in new_state] == before
    assert all(int(s.length) == 4 for s in new_state)


def test_refusals(monkeypatch):
    model = make_small_model()
    with pytest.raises(InputError, match="drop or evict"):
        TritonRunner(model, 8, "error", device="cpu")
    monkeypatch.setenv("HAM_FORCE_REFERENCE", "1")
    with pytest.raises(InputError, match="asks for the reference"):
        TritonRunner(model, 8, "drop", device="cpu")
    monkeypatch.delenv("HAM_FORCE_REFERENCE")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        TritonRunner(model, 8, "drop", device="cpu")
