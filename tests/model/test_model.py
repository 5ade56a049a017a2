"""The three forms of the HAM layer agree, and the limits of tau are GDN + full attention and pure GDN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ham_export.core.model import HAMLM, cached_fraction
from ham_export.errors import CacheFullError, InputError
from ham_export.ops import reference as ref

from ..conftest import make_small_model

MARGIN = 1e-4  # route decisions are compared exactly for scores at least this far from tau


def tokens(b, t, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def mid_threshold(model: HAMLM, toks: torch.Tensor) -> float:
    """A tau that caches a fraction strictly between 0 and 1 with no score within MARGIN of it, in every layer."""
    with torch.no_grad():
        _, routes = model(toks)
    scores = torch.cat([info.score.flatten() for info in routes]).sort().values
    gaps = scores[1:] - scores[:-1]
    n = scores.numel()
    middle = slice(n // 4, 3 * n // 4)
    i = int(gaps[middle].argmax()) + n // 4
    assert float(gaps[i]) > 2 * MARGIN, "no clean gap in the scores; change the seed"
    return float(scores[i] + scores[i + 1]) / 2


def run_forms(model: HAMLM, toks: torch.Tensor, tau, split: int):
    """Logits and routes from (a) the parallel form, (b) prefill + steps, (c) token-by-token steps."""
    b, t = toks.shape
    with torch.no_grad():
        parallel = model(toks, tau)
        state = model.init_state(b, t, fill=float("nan"))
        logits, state, routes = model.prefill(toks[:, :split], state, tau)
        mixed_logits, mixed_routes = [logits], [[r.routed] for r in routes]
        for i in range(split, t):
            logits, state, routes = model.step(toks[:, i], state, tau)
            mixed_logits.append(logits[:, None])
            for layer, info in enumerate(routes):
                mixed_routes[layer].append(info.routed)
        state = model.init_state(b, t, fill=float("nan"))
        step_logits, step_routes = [], [[] for _ in range(model.cfg.n_layers)]
        for i in range(t):
            logits, state, routes = model.step(toks[:, i], state, tau)
            step_logits.append(logits[:, None])
            for layer, info in enumerate(routes):
                step_routes[layer].append(info.routed)
    return (
        (parallel[0], [info.routed for info in parallel[1]]),
        (torch.cat(mixed_logits, 1), [torch.cat(r, 1) for r in mixed_routes]),
        (torch.cat(step_logits, 1), [torch.cat(r, 1) for r in step_routes]),
        state,
    )


@pytest.mark.parametrize("setting", ["all", "zero", "mid", "none"])
def test_parallel_prefill_and_step_forms_agree(small_model, setting):
    toks = tokens(3, 70)
    fixed = {"all": -1.0, "zero": 0.0, "none": 2.5}
    tau = fixed[setting] if setting in fixed else mid_threshold(small_model, toks)
    (lp, rp), (lm, rm), (ls, rs), state = run_forms(small_model, toks, tau, split=37)
    torch.testing.assert_close(lm, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ls, lp, atol=1e-5, rtol=1e-5)
    for layer in range(small_model.cfg.n_layers):
        assert torch.equal(rm[layer], rp[layer]) and torch.equal(rs[layer], rp[layer])
        assert state[layer].length.tolist() == rp[layer].sum(1).tolist()
    fractions = [float(r.float().mean()) for r in rp]
    if setting in ("all", "zero"):
        assert fractions == [1.0] * len(fractions)
    elif setting == "none":
        assert fractions == [0.0] * len(fractions)
    else:
        assert 0.0 < sum(fractions) / len(fractions) < 1.0


def test_cache_holds_exactly_the_routed_keys(small_model):
    toks = tokens(2, 40, seed=1)
    tau = mid_threshold(small_model, toks)
    with torch.no_grad():
        state = small_model.init_state(2, 40, fill=float("nan"))
        _, state, routes = small_model.prefill(toks, state, tau)
    layer = small_model.layers[0]
    with torch.no_grad():
        x = small_model.blocks[0].norm_mixer(small_model.embed(toks))
        _, k, v, *_ = layer._project(x, layer.zero_conv_tail(2))
    for b in range(2):
        idx = routes[0].routed[b].nonzero().flatten()
        n = idx.numel()
        torch.testing.assert_close(state[0].k_cache[b, :, :n], k[b, idx].transpose(0, 1))
        torch.testing.assert_close(state[0].v_cache[b, :, :n], v[b, idx].transpose(0, 1))
        assert bool(state[0].k_cache[b, :, n:].isnan().all())


def layer_pieces(layer, x):
    q, k, v, g, beta, _ = layer._project(x, layer.zero_conv_tail(x.shape[0]))
    o_rnn, _, _ = ref.gdn_recurrent(q, k, v, g, beta, x.new_zeros(x.shape[0], q.shape[2], q.shape[3], v.shape[3]))
    return q, k, v, o_rnn


def test_tau_at_or_below_zero_is_gdn_plus_full_causal_attention(small_model):
    layer = small_model.layers[0]
    x = torch.randn(2, 33, small_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        q, k, v, o_rnn = layer_pieces(layer, x)
        scale = layer.attn_scale[None, :, None, None]
        o_kv = F.scaled_dot_product_attention(scale * q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, scale=1.0).transpose(1, 2)
        expected = layer._combine(x, o_rnn, o_kv)
        for tau in (0.0, -0.5):
            got, info = layer(x, torch.tensor(tau))
            assert bool(info.routed.all())
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tau_above_two_is_pure_gdn(small_model):
    layer = small_model.layers[1]
    x = torch.randn(2, 33, small_model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, _, _, o_rnn = layer_pieces(layer, x)
        expected = layer._combine(x, o_rnn, torch.zeros_like(o_rnn))
        got, info = layer(x, torch.tensor(2.01))
    assert not bool(info.routed.any())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cosine_router_caches_the_first_token_at_tau_one():
    small_model = make_small_model("cosine")
    with torch.no_grad():
        _, routes = small_model(tokens(2, 5), 1.0)
    for info in routes:
        torch.testing.assert_close(info.score[:, 0], torch.ones(2))
        assert bool(info.routed[:, 0].all())


def test_thresholds_per_layer_and_overrides(small_model):
    toks = tokens(2, 30)
    with torch.no_grad():
        _, routes = small_model(toks, [-1.0, 3.0])
    assert cached_fraction(routes) == [1.0, 0.0]
    assert small_model.thresholds(0.25).tolist() == [0.25, 0.25]
    assert small_model.thresholds().tolist() == list(small_model.cfg.thresholds)
    with pytest.raises(InputError, match="3 thresholds for a model with 2 layers"):
        small_model(toks, [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="finite"):
        small_model(toks, float("nan"))


def test_bad_tokens_and_full_cache_give_clear_errors(small_model):
    with pytest.raises(InputError, match="token ids"):
        small_model(torch.tensor([[0, 256]]))
    with pytest.raises(InputError, match="integer tensor"):
        small_model(torch.zeros(2, 3))
    state = small_model.init_state(1, 3)
    with pytest.raises(CacheFullError, match="capacity 3"), torch.no_grad():
        small_model.prefill(tokens(1, 5), state, -1.0)
    with pytest.raises(InputError, match="policy"), torch.no_grad():
        small_model.prefill(tokens(1, 2), state, -1.0, policy="oldest")


def test_batch_rows_are_independent(small_model):
    toks = tokens(3, 25, seed=2)
    tau = mid_threshold(small_model, toks)
    with torch.no_grad():
        state = small_model.init_state(3, 40, fill=float("nan"))
        batch_logits, state, _ = small_model.prefill(toks, state, tau)
        batch_step, _, _ = small_model.step(toks[:, 0], state, tau)
        for b in range(3):
            one = small_model.init_state(1, 40, fill=float("nan"))
            logits, one, _ = small_model.prefill(toks[b:b + 1], one, tau)
            step, _, _ = small_model.step(toks[b:b + 1, 0], one, tau)
            torch.testing.assert_close(logits[0], batch_logits[b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[0], batch_step[b], atol=1e-5, rtol=1e-5)


def test_learned_router_gets_gradient_in_training():
    small_model = make_small_model("learned").train()
    logits, _ = small_model(tokens(2, 20), 0.5)
    logits.square().mean().backward()
    grads = [p.grad for p in small_model.layers[0].router.parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_policies_apply_only_at_capacity(small_model, policy):
    toks = tokens(2, 30, seed=4)
    with torch.no_grad():
        roomy = small_model.init_state(2, 30, fill=float("nan"))
        expected, _, _ = small_model.prefill(toks, roomy, -1.0)
        got, _, routes = small_model.prefill(toks, small_model.init_state(2, 30, fill=float("nan")), -1.0,
                                                 policy=policy)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert all(info.overflow.tolist() == [0, 0] for info in routes)
        tight = small_model.init_state(2, 8, fill=float("nan"))
        logits, tight, routes = small_model.prefill(toks, tight, -1.0, policy=policy)
        assert all(info.overflow.tolist() == [22, 22] for info in routes)
        assert all(s.length.tolist() == [8, 8] and bool(s.k_cache.isfinite().all()) for s in tight)
        logits, tight, routes = small_model.step(toks[:, 0], tight, -1.0, policy=policy)
        assert all(info.overflow.tolist() == [1, 1] for info in routes) and bool(logits.isfinite().all())
