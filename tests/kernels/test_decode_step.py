"""The fused decode step's cache side against the reference composition, under the interpreter.

The reference composition is that of ``HAMLayer._score`` and ``HAMLayer._with_state``: score (min over heads of
``surprise`` in fp32, or a given score), ``route``, ``cache_attention`` over the cache as it stood, ``cache_append``.
Route decisions are compared exactly, the moved cache contents bit for bit, o at a tolerance per dtype. Cache tails
hold NaN throughout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from ham_export.ops import reference as ref
from ham_export.ops.spec import POLICIES

from .support import ROOT, compile_for_hopper, interpreted

ds = interpreted("ham_export.kernels.decode_step")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402  (after the skip above)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # on o, against the fp32 reference
SCORE_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # one unit in the last place


def test_kernels_run_in_the_interpreter():
    for fn in (ds._score_route_kernel, ds._append._cache_append_kernel,
               ds._attention._cache_attention_partial_kernel, ds._attention._cache_attention_combine_kernel):
        assert isinstance(fn, InterpretedFunction)


def _inputs(b, c, lengths, h=2, kd=16, vd=16, dtype=torch.float32, seed=0):
    """q, k, v, vhat, k_cache, v_cache, score_cache, length, scale; row 0's vhat is 0 (the score is exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    q = ref.l2_normalize(torch.randn(b, h, 1, kd, generator=g))
    k = ref.l2_normalize(torch.randn(b, h, 1, kd, generator=g))
    v = torch.randn(b, h, 1, vd, generator=g)
    vhat = v + torch.randn(b, h, 1, vd, generator=g) * torch.linspace(0.2, 3.0, b)[:, None, None, None]
    vhat[0] = 0.0
    k_cache = ref.l2_normalize(torch.randn(b, h, c, kd, generator=g))
    v_cache = torch.randn(b, h, c, vd, generator=g)
    score_cache = torch.rand(b, c, generator=g) * 2
    length = torch.tensor(lengths, dtype=torch.int64)
    for i, n in enumerate(lengths):
        k_cache[i, :, n:] = float("nan")
        v_cache[i, :, n:] = float("nan")
        score_cache[i, n:] = float("nan")
    scale = 4.0 + torch.rand(h, generator=g)
    data = [x.to(dtype) for x in (q, k, v, vhat, k_cache, v_cache, score_cache)]
    return (*data, length, scale.to(dtype))  # one float dtype per op call, as the op specs say


def _given_score(b, dtype, seed=0):
    return torch.rand(b, 1, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)


def _reference_score(vhat, v, score_cache, score):
    if score is not None:
        return score
    return ref.surprise(vhat.float(), v.float()).amin(1).to(score_cache.dtype)  # [B, 1]


def _mid_tau(score):
    """A threshold halfway between two middle scores: some rows routed, none near it."""
    s = score.float().flatten().sort().values
    i = max(len(s) // 2 - 1, 0)
    return torch.tensor(float(s[i] + s[i + 1]) / 2 if len(s) > 1 else float(s[0]) + 0.5)


def _check_step(args, tau, policy, score=None):
    """Run the kernel on copies of the cache and compare everything with the reference composition."""
    q, k, v, vhat, k_cache, v_cache, score_cache, length, scale = args
    dtype = q.dtype
    want_score = _reference_score(vhat, v, score_cache, score)
    want_routed = ref.route(want_score, tau.to(want_score.dtype))
    up = [x.float() for x in (q, k_cache, v_cache)]
    want_o = ref.cache_attention(up[0], up[1], up[2], length, k.float(), v.float(), want_routed, scale.float())

    cache = [x.clone() for x in (k_cache, v_cache, score_cache, length)]
    o, got_score, routed, overflow = ds.decode_step_(q, k, v, vhat, *cache, tau, scale, policy, score)

    assert routed.dtype == torch.bool and routed.shape == want_routed.shape
    assert torch.equal(routed, want_routed)
    if score is None:
        assert got_score.dtype == score_cache.dtype and got_score.shape == want_score.shape
        torch.testing.assert_close(got_score, want_score, atol=SCORE_TOL[score_cache.dtype], rtol=0)
    else:
        assert got_score is score
    assert o.dtype == dtype and o.shape == q.shape[:3] + v.shape[3:]
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.float(), want_o, atol=TOL[dtype], rtol=TOL[dtype])
    # The cache holds the kernel's own score: with it, the append is the reference's bit for bit.
    want = ref.cache_append(k_cache, v_cache, score_cache, length, k, v, got_score, want_routed, policy)
    for name, got, w in zip(("k_cache", "v_cache", "score_cache", "length", "overflow"), (*cache, overflow), want,
                            strict=True):
        torch.testing.assert_close(got, w, atol=0, rtol=0, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    return routed, overflow, cache


def _cases():
    for c in (1, 5, 64, 130):
        lengths = sorted({0, 1, min(c, 3), min(c, 70), max(c - 1, 0), c})
        for policy in POLICIES:
            for router in ("cosine", "given"):
                for tau in ("store-all", "store-none", "mid"):
                    yield pytest.param(c, lengths, policy, router, tau, id=f"C{c}-{policy}-{router}-{tau}")


@pytest.mark.parametrize(("c", "lengths", "policy", "router", "tau"), list(_cases()))
def test_step_matches_reference_composition(c, lengths, policy, router, tau):
    """One call, one row per length (empty, 1, short, a non-multiple of a block, C - 1, full)."""
    b = len(lengths)
    args = _inputs(b, c, lengths, seed=c)
    score = _given_score(b, torch.float32, seed=c) if router == "given" else None
    want_score = _reference_score(args[3], args[2], args[6], score)
    tau_t = dict(store_all=torch.tensor(-1.0), store_none=torch.tensor(2.5)).get(tau.replace("-", "_"))
    if tau_t is None:
        tau_t = _mid_tau(want_score)
    routed, overflow, _ = _check_step(args, tau_t, policy, score)
    if tau == "store-all":
        assert bool(routed.all()) and overflow.tolist()[-1] == 1  # the full row overflows
    elif tau == "store-none":
        assert not bool(routed.any()) and not bool(overflow.any())
    else:
        assert 0 < int(routed.sum()) < b


def test_zero_prediction_scores_one_and_routes_at_tau_one():
    """vhat = 0 (the first token of a sequence) gives e = 1 for every head; the route test is >=."""
    args = _inputs(3, 5, [0, 2, 5])
    routed, _, cache = _check_step(args, torch.tensor([1.0]), "drop")
    assert bool(routed[0]) and cache[2][0, 0].item() == 1.0


@pytest.mark.parametrize("tau", [torch.tensor(0.9, dtype=torch.float64), torch.tensor([0.9]),
                                 torch.tensor(0.9, dtype=torch.float16)])
def test_tau_as_0_dim_or_1_element_any_float(tau):
    _check_step(_inputs(4, 6, [0, 3, 5, 6], seed=1), tau, "evict")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("router", ["cosine", "given"])
def test_low_precision(dtype, router):
    lengths = [0, 1, 40, 70, 129, 130]
    args = _inputs(len(lengths), 130, lengths, dtype=dtype, seed=2)
    score = _given_score(len(lengths), dtype, seed=2) if router == "given" else None
    tau = _mid_tau(_reference_score(args[3], args[2], args[6], score))
    for policy in POLICIES:
        _check_step(args, tau, policy, score)


def test_strided_inputs():
    b, h, c, kd, vd = 3, 2, 9, 16, 8
    args = list(_inputs(b, c, [9, 4, 0], h=h, kd=kd, vd=vd, seed=3))
    q = torch.empty(b, 1, h, 2 * kd).transpose(1, 2)[..., ::2]
    q.copy_(args[0])
    vhat = torch.empty(h, b, 1, vd).transpose(0, 1)
    vhat.copy_(args[3])
    k_cache = torch.full((b, c, h, kd), float("nan")).transpose(1, 2)
    k_cache.copy_(args[4])
    score_cache = torch.full((c, b), float("nan")).t()
    score_cache.copy_(args[6])
    args[0], args[3], args[4], args[6] = q, vhat, k_cache, score_cache
    assert not any(x.is_contiguous() for x in (q, vhat, k_cache, score_cache))
    for policy in POLICIES:
        _check_step(tuple(args), torch.tensor(0.0), policy)
        _check_step(tuple(args), torch.tensor(0.5), policy, torch.rand(2 * b, 1)[::2])


@pytest.mark.parametrize("policy", POLICIES)
def test_a_run_of_steps_fills_and_overflows_the_cache(policy):
    """Eight tokens into capacity 3, state carried from step to step; every step against the reference."""
    b, c = 2, 3
    args = _inputs(b, c, [0, 2], seed=4)
    state = list(args[4:8])
    for step in range(8):
        fresh = _inputs(b, c, [0, 2], seed=10 + step)
        tau = torch.tensor(0.3 if step % 3 else -1.0)
        before = state[3].clone()
        routed, overflow, state = _check_step((*fresh[:4], *state, args[8]), tau, policy)
        assert overflow.tolist() == (routed[:, 0] & (before == c)).long().tolist()
    assert state[3].tolist() == [c, c]


def test_min_bytes():
    # q, k, v, vhat read and o written per row; every row appends by default.
    assert ds.min_bytes(2, 3, 10, 4, 8, torch.float16) == 2 * 3 * ((10 + 2) * 12 + 2 * (2 * 4 + 3 * 8))
    assert ds.min_bytes(2, 3, 10, 4, 8, torch.float32, appended=0, cosine=False) == 4 * 3 * (10 * 12 + 2 * 24)


def _bad(**change):
    names = ("q", "k", "v", "vhat", "k_cache", "v_cache", "score_cache", "length", "scale")
    args = dict(zip(names, _inputs(1, 8, [8]), strict=True))
    args.update(tau=torch.tensor(0.5), policy="drop", score=None)
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "message"), [
    (dict(q=torch.zeros(1, 2, 2, 16)), "input 'k' has shape [1, 2, 1, 16], expected [B, H, T, K] with T = 2 (from"),
    (dict(vhat=torch.zeros(1, 2, 1, 8)), "vhat must have shape (1, 2, 1, 16) (from q (1, 2, 1, 16), v (1, 2, 1,"),
    (dict(vhat=torch.zeros(1, 2, 1, 16, dtype=torch.float16)), "vhat must have v's dtype torch.float32, got"),
    (dict(vhat=None), "vhat must be a torch.Tensor, got NoneType (vhat is needed when no score is given)"),
    (dict(tau=torch.zeros(2)), "tau must be a 0-dim or [1] tensor, got shape (2,)"),
    (dict(tau=torch.tensor(1)), "tau must be a floating-point tensor, got torch.int64"),
    (dict(tau=0.5), "tau must be a torch.Tensor, got float"),
    (dict(score=torch.zeros(1)), "score must have shape (1, 1) (from q (1, 2, 1, 16), v (1, 2, 1, 16)), got (1,)"),
    (dict(score=torch.zeros(1, 1, dtype=torch.float16)), "input 'score' is float16, expected float32 like input"),
    (dict(policy="error"), "policy must be one of ('drop', 'evict'), got 'error'"),
    (dict(scale=torch.ones(3)), "input 'scale' has shape [3], expected [H] with H = 2 (from input 'q')"),
    (dict(length=torch.zeros(1, dtype=torch.int32)), "input 'length' is int32, expected int64"),
    (dict(score_cache=torch.zeros(1, 7)), "input 'score_cache' has shape [1, 7], expected [B, C] with C = 8 (from"),
    (dict(v_cache=torch.zeros(1, 2, 8, 16, dtype=torch.float16)), "input 'v_cache' is float16, expected float32 like"),
])
def test_bad_inputs_raise_value_error_before_any_write(change, message):
    args = _bad(**change)
    before = [args[n].clone() for n in ("k_cache", "score_cache", "length")]
    with pytest.raises(ValueError, match=re.escape(message)):
        ds.decode_step_(**args)
    for n, w in zip(("k_cache", "score_cache", "length"), before, strict=True):
        torch.testing.assert_close(args[n], w, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize(("dtype", "cosine"), [("*fp32", True), ("*bf16", True), ("*bf16", False)])
def test_score_route_kernel_compiles_for_hopper(dtype, cosine):
    compile_for_hopper("ham_export.kernels.decode_step", {
        "_score_route_kernel": (
            dict(vhat_ptr=dtype, v_ptr=dtype, tau_ptr="*fp32", score_ptr=dtype, routed_ptr="*u8"),
            dict(COSINE=cosine, BLOCK_H=32, BLOCK_V=128, EPS=ref.COS_EPS)),
    })


_ON_GPU = textwrap.dedent("""
    import torch
    from ham_export import reference as ref
    from kernels import decode_step as ds
    from triton.runtime.jit import JITFunction

    assert isinstance(ds._score_route_kernel, JITFunction)
    g = torch.Generator().manual_seed(0)
    b, h, c, kd, vd = 6, 4, 300, 64, 64
    for dtype in (torch.float32, torch.bfloat16):
        for policy in POLICIES:
            for given in (False, True):
                q, k = (ref.l2_normalize(torch.randn(b, h, 1, kd, generator=g)) for _ in range(2))
                v, vhat = (torch.randn(b, h, 1, vd, generator=g) for _ in range(2))
                kc = ref.l2_normalize(torch.randn(b, h, c, kd, generator=g))
                vc = torch.randn(b, h, c, vd, generator=g)
                sc = torch.rand(b, c, generator=g)
                length = torch.tensor([0, 1, 64, 150, c - 1, c])
                for i, n in enumerate(length.tolist()):
                    kc[i, :, n:] = vc[i, :, n:] = sc[i, n:] = float("nan")
                score = torch.rand(b, 1, generator=g) if given else None
                scale, tau = 4.0 + torch.rand(h, generator=g), torch.tensor(0.5)
                cpu = [x.to(dtype) for x in (q, k, v, vhat, kc, vc, sc)] + [length]
                dev = [x.cuda() for x in cpu]
                sdev = None if score is None else score.to(dtype).cuda()
                ds.decode_step_(*[x.clone() for x in dev], tau.cuda(), scale.cuda(), policy, sdev)  # compile
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # the step itself must not synchronise
                o, s, r, ov = ds.decode_step_(*dev, tau.cuda(), scale.cuda(), policy, sdev)
                torch.cuda.set_sync_debug_mode("default")
                ws = ref.surprise(cpu[3].float(), cpu[2].float()).amin(1).to(dtype) if score is None else sdev.cpu()
                wr = ref.route(ws, tau.to(dtype))
                assert torch.equal(r.cpu(), wr), (r, wr)
                up = [x.float() for x in cpu[:6]]
                wo = ref.cache_attention(up[0], up[4], up[5], length, up[1], up[2], wr, scale)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(o.float().cpu(), wo, atol=tol, rtol=tol)
                want = ref.cache_append(*cpu[4:8], cpu[1], cpu[2], s.cpu(), wr, policy)
                for got, w in zip((*dev[4:8], ov), want):
                    torch.testing.assert_close(got.cpu(), w, atol=0, rtol=0, equal_nan=True)
    print("ok")
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels, not the "
                                                          "interpreter)")
def test_compiled_step_on_a_gpu_matches_and_does_not_synchronise():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _ON_GPU], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-4000:]
