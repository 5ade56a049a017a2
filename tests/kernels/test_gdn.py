"""GDN Triton kernels on a CPU-only machine: parity under the interpreter and a Hopper (sm_90) compile without a GPU.

``gdn_step`` is checked against ``reference.gdn_step`` and ``gdn_chunked`` against ``reference.gdn_recurrent``
(the token-by-token oracle), both computed in float64 from the same inputs. Outputs and state
preallocated by a test are filled with NaN, so that a missed write shows.
"""

from __future__ import annotations

import re

import pytest
import torch

from ham_export.ops import reference as ref

from .support import compile_for_hopper, interpreted

gdn = interpreted("ham_export.kernels.gdn")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402  (after the skip above)

# Tolerance policy: fp32 against the float64 reference; fp16 / bf16 inputs against the float64 reference of the
# same (rounded) inputs, so the error is the kernel's own output and state rounding plus fp32 arithmetic.
# Seen on these cases: fp32 1.6e-6, fp16 2.7e-4, bf16 4.3e-3 (as |got - want| / (1 + |want|)).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def test_kernels_run_in_the_interpreter():
    assert isinstance(gdn._gdn_step_kernel, InterpretedFunction)
    assert isinstance(gdn._gdn_chunked_kernel, InterpretedFunction)


def _double_reference(fn, *args):
    """``fn`` computed in float64 from the given inputs (the kernels' results are upcast to compare)."""
    return fn(*(a.double() for a in args))


def _assert_close(got, want, dtype, **tol):
    tol = tol or TOL[dtype]
    for name, g, w in zip(("o", "vhat", "state"), got, want, strict=True):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m, name=name: f"{name}: {m}")


def _step_inputs(b, h, kd, vd, dtype=torch.float32, state_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = ref.l2_normalize(torch.randn(b, h, kd, generator=gen))
    k = ref.l2_normalize(torch.randn(b, h, kd, generator=gen))
    v = torch.randn(b, h, vd, generator=gen)
    alpha = 0.05 + 0.9 * torch.rand(b, h, generator=gen)
    beta = 0.05 + 0.9 * torch.rand(b, h, generator=gen)
    state = torch.randn(b, h, kd, vd, generator=gen)
    return (q.to(dtype), k.to(dtype), v.to(dtype), alpha.to(dtype), beta.to(dtype),
            state.to(state_dtype or dtype))


def _chunk_inputs(b, t, h, kd, vd, dtype=torch.float32, state_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = ref.l2_normalize(torch.randn(b, t, h, kd, generator=gen))
    k = ref.l2_normalize(torch.randn(b, t, h, kd, generator=gen))
    v = torch.randn(b, t, h, vd, generator=gen)
    g = -0.5 * torch.rand(b, t, h, generator=gen)
    g[:, ::7] = -8.0  # strong decay on some tokens
    beta = 0.05 + 0.9 * torch.rand(b, t, h, generator=gen)
    state = torch.randn(b, h, kd, vd, generator=gen)
    return (q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype), beta.to(dtype), state.to(state_dtype or dtype))


STEP_DIMS = [(8, 8), (16, 16), (32, 32), (16, 32), (32, 8)]


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize(("kd", "vd"), STEP_DIMS, ids=[f"K{k}-V{v}" for k, v in STEP_DIMS])
@pytest.mark.parametrize("mode", ["new", "out", "in_place"])
def test_step_matches_reference(b, kd, vd, mode):
    args = _step_inputs(b, 2, kd, vd, seed=kd + vd + b)
    want = _double_reference(ref.gdn_step, *args)
    state = args[5].clone()
    if mode == "new":
        got = gdn.gdn_step(*args)
    elif mode == "out":
        out = torch.full_like(state, float("nan"))
        got = gdn.gdn_step(*args, out_state=out)
        assert got[2] is out
    else:
        got = gdn.gdn_step(*args[:5], state, out_state=state)
        assert got[2] is state
    if mode != "in_place":
        assert torch.equal(args[5], state)  # the input state is left alone
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    _assert_close(got, want, torch.float32)


def test_step_several_value_blocks():
    """V = 40 over blocks of 16: three programs per head, the last one masked."""
    args = _step_inputs(2, 2, 16, 40, seed=3)
    _assert_close(gdn._step(*args, out_state=None, block_v=16), _double_reference(ref.gdn_step, *args),
                  torch.float32)


CHUNK_T = [1, 5, gdn.CHUNK, gdn.CHUNK + 1, 3 * gdn.CHUNK - 2]


@pytest.mark.parametrize("t", CHUNK_T)
@pytest.mark.parametrize(("b", "kd", "vd"), [(1, 16, 16), (2, 8, 32), (1, 32, 8)])
def test_chunked_matches_recurrent(t, b, kd, vd):
    args = _chunk_inputs(b, t, 2, kd, vd, seed=t + kd)
    state = args[5].clone()
    got = gdn.gdn_chunked(*args)
    assert torch.equal(args[5], state)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    _assert_close(got, _double_reference(ref.gdn_recurrent, *args), torch.float32)


@pytest.mark.parametrize(("chunk", "block_v", "t", "vd"), [(16, 16, 37, 40), (16, 32, 16, 20), (64, 16, 70, 16)])
def test_chunked_other_configs(chunk, block_v, t, vd):
    """Other chunk sizes and value blocks give the same results (several value blocks, masked tails)."""
    args = _chunk_inputs(1, t, 2, 16, vd, seed=chunk)
    _assert_close(gdn._chunked(*args, chunk=chunk, block_v=block_v), _double_reference(ref.gdn_recurrent, *args),
                  torch.float32)


def test_chunked_long_sequence_strong_decay_stays_finite():
    """Cumulative decay far past fp32's range inside a chunk (g = -8 on every token of the middle stretch)."""
    q, k, v, g, beta, state = _chunk_inputs(1, 3 * gdn.CHUNK, 1, 16, 16, seed=5)
    g[:, gdn.CHUNK // 2: 2 * gdn.CHUNK + 5] = -8.0  # G reaches -8 * CHUNK within a chunk: exp(-G) would overflow
    args = (q, k, v, g, beta, state)
    _assert_close(gdn.gdn_chunked(*args), _double_reference(ref.gdn_recurrent, *args), torch.float32)


def test_chunked_agrees_with_step():
    """gdn_chunked over T tokens and T calls of gdn_step (in place) end in the same state."""
    q, k, v, g, beta, state = _chunk_inputs(1, 7, 2, 16, 16, seed=6)
    o, vhat, final = gdn.gdn_chunked(q, k, v, g, beta, state)
    s = state.clone()
    for i in range(q.shape[1]):
        o_i, vhat_i, _ = gdn.gdn_step(q[:, i], k[:, i], v[:, i], g[:, i].exp(), beta[:, i], s, out_state=s)
        torch.testing.assert_close(o_i, o[:, i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vhat_i, vhat[:, i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, final, atol=1e-5, rtol=1e-5)


def _max_error(got, want) -> float:
    return max(float((g.double() - w).abs().max()) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("state_dtype", ["same", "float32"])
def test_low_precision_inputs(dtype, state_dtype):
    sd = dtype if state_dtype == "same" else torch.float32
    args = _step_inputs(2, 2, 16, 32, dtype=dtype, state_dtype=sd, seed=7)
    got = gdn.gdn_step(*args)
    assert (got[0].dtype, got[1].dtype, got[2].dtype) == (dtype, dtype, sd)
    _assert_close(got, _double_reference(ref.gdn_step, *args), dtype)

    if state_dtype != "same":  # the op (gdn_prefill) has one float dtype per call
        with pytest.raises(ValueError, match="input 'state' is float32, expected"):
            gdn.gdn_chunked(*_chunk_inputs(1, 5, 2, 16, 32, dtype=dtype, state_dtype=sd, seed=8))
        return
    args = _chunk_inputs(1, gdn.CHUNK + 3, 2, 16, 32, dtype=dtype, state_dtype=sd, seed=8)
    got = gdn.gdn_chunked(*args)
    assert (got[0].dtype, got[1].dtype, got[2].dtype) == (dtype, dtype, sd)
    want = _double_reference(ref.gdn_recurrent, *args)
    _assert_close(got, want, dtype)
    # Over many tokens the error must stay within 2x the reference's own error in that dtype (flash-attention's
    # rule; seen: at most 1x). A single step is only output rounding for both, so the tolerance above is its check.
    own = ref.gdn_recurrent(*(a.to(dtype) for a in args))
    assert _max_error(got, want) <= 2 * _max_error(own, want)


def test_gates_in_float32_with_half_inputs():
    """gdn_step (no op: the model's decode step) takes gates and state in float32 beside float16 inputs; the
    chunked kernel runs the op gdn_prefill, whose spec has one float dtype per call, and refuses them."""
    q, k, v, g, beta, state = _chunk_inputs(1, 9, 2, 16, 16, dtype=torch.float16, seed=9)
    args = (q[:, 0], k[:, 0], v[:, 0], g[:, 0].float().exp(), beta[:, 0].float(), state.float())
    _assert_close(gdn.gdn_step(*args), _double_reference(ref.gdn_step, *args), torch.float16)
    with pytest.raises(ValueError, match="input 'g' is float32, expected float16 like input 'q'"):
        gdn.gdn_chunked(q, k, v, g.float(), beta.float(), state.float())


def _strided(x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """A copy of ``x`` with the same shape and values, stored with its dims in the order ``perm`` and every
    other element of the last stored dim skipped."""
    storage = torch.full([x.shape[p] for p in perm[:-1]] + [2 * x.shape[perm[-1]]], float("nan"), dtype=x.dtype)
    view = storage[..., ::2].permute(*[perm.index(i) for i in range(x.dim())])
    view.copy_(x)
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


def test_strided_inputs():
    args = _step_inputs(2, 2, 16, 16, seed=10)
    strided = (_strided(args[0], (1, 0, 2)), args[1].transpose(0, 1).contiguous().transpose(0, 1),
               _strided(args[2], (2, 0, 1)), args[3].t().contiguous().t(), _strided(args[4], (0, 1)),
               _strided(args[5], (0, 1, 3, 2)))
    want = _double_reference(ref.gdn_step, *args)
    _assert_close(gdn.gdn_step(*strided), want, torch.float32)
    out = _strided(torch.zeros_like(args[5]), (3, 2, 1, 0))
    got = gdn.gdn_step(*strided, out_state=out)
    assert got[2] is out
    _assert_close(got, want, torch.float32)
    state = strided[5].clone().transpose(2, 3).contiguous().transpose(2, 3)  # in place into a transposed layout
    _assert_close(gdn.gdn_step(*strided[:5], state, out_state=state), want, torch.float32)

    args = _chunk_inputs(2, 11, 2, 16, 16, seed=11)
    strided = (_strided(args[0], (0, 2, 1, 3)), _strided(args[1], (2, 1, 0, 3)), _strided(args[2], (3, 0, 1, 2)),
               _strided(args[3], (0, 2, 1)), args[4][:, :, :1].expand(-1, -1, 2), _strided(args[5], (1, 0, 3, 2)))
    args = (*args[:4], strided[4], args[5])
    _assert_close(gdn.gdn_chunked(*strided), _double_reference(ref.gdn_recurrent, *args), torch.float32)


def _bad_step(**change):
    args = dict(zip(("q", "k", "v", "alpha", "beta", "state"), _step_inputs(1, 2, 16, 8), strict=True))
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "message"), [
    (dict(k=torch.zeros(1, 2, 8)), "k must have shape"),
    (dict(v=torch.zeros(1, 3, 8)), "v must have shape"),
    (dict(alpha=torch.zeros(1, 2, 1)), "alpha must have 2 dimensions"),
    (dict(beta=torch.zeros(2, 2)), "beta must have shape"),
    (dict(state=torch.zeros(1, 2, 8, 16)), "state must have shape"),
    (dict(out_state=torch.zeros(1, 2, 16, 16)), "out_state must have shape"),
    (dict(out_state=torch.zeros(1, 2, 16, 8, dtype=torch.float16)), "out_state must have state's dtype"),
    (dict(q=torch.zeros(1, 2, 16, dtype=torch.float64)), "q must be one of"),
    (dict(v=torch.zeros(1, 2, 8, dtype=torch.float16)), "v must have q's dtype"),
    (dict(state=torch.zeros(1, 2, 16, 8, dtype=torch.float64)), "state must be q's dtype or torch.float32"),
    (dict(q=torch.zeros(0, 2, 16), k=torch.zeros(0, 2, 16), v=torch.zeros(0, 2, 8), alpha=torch.zeros(0, 2),
          beta=torch.zeros(0, 2), state=torch.zeros(0, 2, 16, 8)), "empty batch"),
    (dict(q=torch.zeros(1, 2, 512), k=torch.zeros(1, 2, 512), state=torch.zeros(1, 2, 512, 8)),
     "K = 512 is wider than the 256"),
    (dict(alpha=0.5), "alpha must be a torch.Tensor"),
    (dict(beta=torch.zeros(1, 2, device="meta")), "all inputs must be on one device"),
])
def test_step_bad_inputs_raise_value_error(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gdn.gdn_step(**_bad_step(**change))


def _bad_chunked(**change):
    args = dict(zip(("q", "k", "v", "g", "beta", "state"), _chunk_inputs(1, 3, 2, 16, 8), strict=True))
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "message"), [
    (dict(k=torch.zeros(1, 4, 2, 16)), "input 'k' has shape [1, 4, 2, 16], expected [B, T, H, K] with T = 3"),
    (dict(v=torch.zeros(1, 3, 8)), "input 'v' has shape [1, 3, 8] (rank 3), expected rank 4: [B, T, H, V]"),
    (dict(g=torch.zeros(1, 3, 3)), "input 'g' has shape [1, 3, 3], expected [B, T, H] with H = 2 (from input 'q')"),
    (dict(beta=torch.zeros(1, 3, 2, 1)), "input 'beta' has shape [1, 3, 2, 1] (rank 4), expected rank 3: [B, T, H]"),
    (dict(state=torch.zeros(1, 2, 8, 16)), "input 'state' has shape [1, 2, 8, 16], expected [B, H, K, V] with K = 16"),
    (dict(q=torch.zeros(1, 3, 2, 16, dtype=torch.int32)), "input 'q' is int32; the float inputs must be float32 or"),
    (dict(k=torch.zeros(1, 3, 2, 16, dtype=torch.bfloat16)), "input 'k' is bfloat16, expected float32 like input 'q'"),
    (dict(g=torch.zeros(1, 3, 2, dtype=torch.float16)), "input 'g' is float16, expected float32 like input 'q'"),
    (dict(q=torch.zeros(1, 0, 2, 16), k=torch.zeros(1, 0, 2, 16), v=torch.zeros(1, 0, 2, 8), g=torch.zeros(1, 0, 2),
          beta=torch.zeros(1, 0, 2)), "input 'q' has shape [1, 0, 2, 16]: T must be at least 1"),
    (dict(state=None), "input 'state' must be a tensor, got NoneType"),
])
def test_chunked_bad_inputs_raise_value_error(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gdn.gdn_chunked(**_bad_chunked(**change))


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16"])
def test_kernels_compile_for_hopper(dtype):
    vectors = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, o_ptr=dtype, vhat_ptr=dtype, scale="fp32")
    compile_for_hopper("ham_export.kernels.gdn", {
        "_gdn_step_kernel": (
            dict(vectors, alpha_ptr=dtype, beta_ptr=dtype, state_ptr="*fp32", new_state_ptr="*fp32"),
            dict(BLOCK_K=128, BLOCK_V=gdn.STEP_BLOCK_V)),
        "_gdn_chunked_kernel": (
            dict(vectors, g_ptr="*fp32", beta_ptr=dtype, state_ptr=dtype, final_ptr=dtype),
            dict(BT=gdn.CHUNK, BLOCK_K=128, BLOCK_V=gdn.CHUNK_BLOCK_V)),
    })
