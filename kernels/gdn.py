"""Triton kernels for the Gated DeltaNet (GDN) recurrence: the decode step and the chunked prefill.

References: :func:`ham_export.ops.reference.gdn_step` and :func:`ham_export.ops.reference.gdn_chunked` (whose oracle is
:func:`ham_export.ops.reference.gdn_recurrent`); same arguments, same order, same names, same shapes. The state layout
is [B, H, K, V]: vhat = alpha * (k^T S), S' = alpha S + beta k (v - vhat)^T, o = (q^T S') / sqrt(K).

``gdn_step`` (one decode token), ``_gdn_step_kernel``: grid (B * H, cdiv(V, BLOCK_V)), one program per (batch, head,
block of ``BLOCK_V`` value columns). It loads its [K, BLOCK_V] block of the state once, forms vhat, the updated
block and o from it in registers, and stores o, vhat and the block: the state is read once and written once (the
kernel is memory bound). A program reads its whole block before it writes it, and no two programs share a block, so
``out_state`` may be ``state`` itself (an in-place update). Pinned: ``STEP_BLOCK_V`` = 32, 4 warps, 1 stage.

``gdn_chunked`` (prefill over T tokens), ``_gdn_chunked_kernel``: grid (B * H, cdiv(V, BLOCK_V)), one program per
(batch, head, block of ``BLOCK_V`` value columns) keeps its [K, BLOCK_V] block of the state in registers in fp32 and
walks the sequence in chunks of ``CHUNK`` tokens. Within a chunk, with G the cumulative log-decay from the chunk's
start, D_ij = exp(G_i - G_j) for j <= i (masked to the causal part before the exp, so only differences of G, all
<= 0 for a decay, are exponentiated and long sequences with strong decay stay finite) and S0 the state at the
chunk's start, the UT form of the delta rule is

    A = strictly-lower(beta_i D_ij (k_i . k_j)),  U = (I + A)^{-1} (beta (V - exp(G) K S0)),
    vhat = exp(G) K S0 + strictly-lower(D_ij (k_i . k_j)) U,
    o = (exp(G) Q S0 + lower(D_ij (q_i . k_j)) U) / sqrt(K),
    S = exp(G_last) S0 + (exp(G_last - G) K)^T U.

(I + A)^{-1} is built row by row in registers: a loop of CHUNK - 1 steps over the [CHUNK, CHUNK] tile (forward
substitution of the unit lower-triangular system). Every product is a ``tl.dot`` with fp32 IEEE inputs (no TF32),
so every dot dimension is padded to at least 16 (masked loads). The tail chunk of a T that is not a multiple of
``CHUNK`` is masked: padded tokens load k = v = q = 0, g = 0, beta = 0, so they leave the state unchanged, and their
outputs are not stored. Pinned: ``CHUNK`` = 32 tokens, ``CHUNK_BLOCK_V`` = 32, 4 warps, 2 stages.

Both kernels: K is held whole in a program (BLOCK_K = next power of two of K, at least 16, at most ``MAX_K``); all
arithmetic is fp32 whatever the input dtype (float16, bfloat16 or float32); the state may be in the inputs' dtype or
float32, and outputs are in the inputs' dtype (the new state in the state's dtype); any strides (offsets in int64).
Configs are pinned; nothing is autotuned (the step kernel may write the state in place).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ham_export.ops.spec import FLOAT_DTYPES, GDN_PREFILL

from . import _validate

STEP_BLOCK_V = 32  # value columns per program of the decode step
CHUNK = 32  # tokens per chunk of the prefill
CHUNK_BLOCK_V = 32  # value columns per program of the prefill
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_K = 256  # widest key a program keeps in registers
NUM_WARPS = 4
STEP_STAGES = 1
CHUNK_STAGES = 2


@triton.jit
def _gdn_step_kernel(
    q_ptr, k_ptr, v_ptr, alpha_ptr, beta_ptr, state_ptr, o_ptr, vhat_ptr, new_state_ptr,
    H, K, V, scale,
    sq_b, sq_h, sq_k,
    sk_b, sk_h, sk_k,
    sv_b, sv_h, sv_v,
    sa_b, sa_h,
    sbt_b, sbt_h,
    ss_b, ss_h, ss_k, ss_v,
    so_b, so_h, so_v,
    svh_b, svh_h, svh_v,
    sn_b, sn_h, sn_k, sn_v,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_s = mask_k[:, None] & mask_v[None, :]

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_k * sq_k, mask=mask_k, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_k * sk_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_v * sv_v, mask=mask_v, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + b * sa_b + h * sa_h).to(tl.float32)
    beta = tl.load(beta_ptr + b * sbt_b + h * sbt_h).to(tl.float32)
    s = tl.load(state_ptr + b * ss_b + h * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v,
                mask=mask_s, other=0.0).to(tl.float32)

    vhat = alpha * tl.sum(k[:, None] * s, axis=0)
    s = alpha * s + (beta * k)[:, None] * (v - vhat)[None, :]
    o = tl.sum(q[:, None] * s, axis=0) * scale

    tl.store(o_ptr + b * so_b + h * so_h + offs_v * so_v, o.to(o_ptr.dtype.element_ty), mask=mask_v)
    tl.store(vhat_ptr + b * svh_b + h * svh_h + offs_v * svh_v, vhat.to(vhat_ptr.dtype.element_ty), mask=mask_v)
    tl.store(new_state_ptr + b * sn_b + h * sn_h + offs_k[:, None] * sn_k + offs_v[None, :] * sn_v,
             s.to(new_state_ptr.dtype.element_ty), mask=mask_s)


@triton.jit
def _gdn_chunked_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, o_ptr, vhat_ptr, final_ptr,
    T, H, K, V, scale,
    sq_b, sq_t, sq_h, sq_k,
    sk_b, sk_t, sk_h, sk_k,
    sv_b, sv_t, sv_h, sv_v,
    sg_b, sg_t, sg_h,
    sbt_b, sbt_t, sbt_h,
    ss_b, ss_h, ss_k, ss_v,
    so_b, so_t, so_h, so_v,
    svh_b, svh_t, svh_h, svh_v,
    sf_b, sf_h, sf_k, sf_v,
    BT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_s = mask_k[:, None] & mask_v[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    eye = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)

    s = tl.load(state_ptr + b * ss_b + h * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v,
                mask=mask_s, other=0.0).to(tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    g_base = g_ptr + b * sg_b + h * sg_h
    beta_base = beta_ptr + b * sbt_b + h * sbt_h
    o_base = o_ptr + b * so_b + h * so_h
    vhat_base = vhat_ptr + b * svh_b + h * svh_h

    for t0 in range(0, T, BT):
        tok = t0 + offs_t
        mask_t = tok < T
        tok64 = tok.to(tl.int64)
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        kc = tl.load(k_base + tok64[:, None] * sk_t + offs_k[None, :] * sk_k, mask=mask_tk, other=0.0)
        kc = kc.to(tl.float32)
        qc = tl.load(q_base + tok64[:, None] * sq_t + offs_k[None, :] * sq_k, mask=mask_tk, other=0.0)
        qc = qc.to(tl.float32)
        vc = tl.load(v_base + tok64[:, None] * sv_t + offs_v[None, :] * sv_v, mask=mask_tv, other=0.0)
        vc = vc.to(tl.float32)
        gc = tl.load(g_base + tok64 * sg_t, mask=mask_t, other=0.0).to(tl.float32)
        bc = tl.load(beta_base + tok64 * sbt_t, mask=mask_t, other=0.0).to(tl.float32)

        big_g = tl.cumsum(gc, axis=0)  # G_i: log-decay from the chunk's start through token i
        g_last = tl.sum(tl.where(offs_t == BT - 1, big_g, 0.0), axis=0)  # padded tokens add g = 0
        decay = tl.exp(tl.where(causal, big_g[:, None] - big_g[None, :], float("-inf")))
        kk = tl.where(strict, decay * tl.dot(kc, tl.trans(kc), input_precision="ieee"), 0.0)
        qk = decay * tl.dot(qc, tl.trans(kc), input_precision="ieee")

        # (I + A)^{-1} - I, row by row: row i = N_i + sum_{j<i} N_ij row_j with N = -A (rows j < i already done).
        inv = -bc[:, None] * kk
        for i in range(1, BT):
            row = tl.sum(tl.where(offs_t[:, None] == i, inv, 0.0), axis=0)
            row = row + tl.sum(row[:, None] * inv, axis=0)
            inv = tl.where(offs_t[:, None] == i, row[None, :], inv)
        inv = inv + eye

        e_g = tl.exp(big_g)
        ks = e_g[:, None] * tl.dot(kc, s, input_precision="ieee")  # exp(G) K S0
        u = tl.dot(inv, bc[:, None] * (vc - ks), input_precision="ieee")
        vhat = ks + tl.dot(kk, u, input_precision="ieee")
        o = (e_g[:, None] * tl.dot(qc, s, input_precision="ieee") + tl.dot(qk, u, input_precision="ieee")) * scale
        tl.store(o_base + tok64[:, None] * so_t + offs_v[None, :] * so_v, o.to(o_ptr.dtype.element_ty), mask=mask_tv)
        tl.store(vhat_base + tok64[:, None] * svh_t + offs_v[None, :] * svh_v, vhat.to(vhat_ptr.dtype.element_ty),
                 mask=mask_tv)

        k_to_end = tl.exp(g_last - big_g)[:, None] * kc
        s = tl.exp(g_last) * s + tl.dot(tl.trans(k_to_end), u, input_precision="ieee")

    tl.store(final_ptr + b * sf_b + h * sf_h + offs_k[:, None] * sf_k + offs_v[None, :] * sf_v,
             s.to(final_ptr.dtype.element_ty), mask=mask_s)


@triton.jit
def gdn_prefill_trt(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr,
    T, H, K, V,
    o_ptr, vhat_ptr, state_out_ptr,
    BT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, SCALE: tl.constexpr,
):
    """The chunked prefill in TensorRT's plugin ABI: the op's inputs, its sizes as int32 scalars, its outputs;
    contiguous tensors (strides from the sizes, in int64). The read-out scale 1 / sqrt(K) is a constexpr (TensorRT
    passes no float scalars; K is fixed when the plugin is built)."""
    t, h, k, v = T.to(tl.int64), H.to(tl.int64), K.to(tl.int64), V.to(tl.int64)
    _gdn_chunked_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, o_ptr, vhat_ptr, state_out_ptr,
        T, H, K, V, SCALE,
        t * h * k, h * k, k, 1,
        t * h * k, h * k, k, 1,
        t * h * v, h * v, v, 1,
        t * h, h, 1,
        t * h, h, 1,
        h * k * v, k * v, v, 1,
        t * h * v, h * v, v, 1,
        t * h * v, h * v, v, 1,
        h * k * v, k * v, v, 1,
        BT, BLOCK_K, BLOCK_V,
    )


def chunked_grid(dims, cdiv=triton.cdiv, block_v: int = CHUNK_BLOCK_V) -> tuple:
    """The chunked kernel's grid, from the sizes of the op's shape letters (ints, or TensorRT's shape
    expressions); ``block_v`` as :func:`chunked_blocks` gives it."""
    return (dims["B"] * dims["H"], cdiv(dims["V"], block_v))


def chunked_blocks(kd: int, vd: int, block_v: int = CHUNK_BLOCK_V) -> dict[str, int]:
    """BLOCK_K and BLOCK_V of the chunked kernel for key and value widths K and V."""
    return dict(BLOCK_K=_block(kd), BLOCK_V=min(block_v, _block(vd)))


def _check_common(named: dict, gates: tuple[str, str], b: int, h: int, kd: int, vd: int) -> None:
    """What both kernels ask: q, k, v in one float dtype, the gates and the state in it or float32; no empty
    dimension; K at most MAX_K."""
    _validate.dtypes(named, dict(q=FLOAT_DTYPES, k="q", v="q"))
    allowed = tuple(dict.fromkeys((named["q"].dtype, torch.float32)))
    for name in (*gates, "state"):
        if named[name].dtype not in allowed:
            raise ValueError(f"{name} must be q's dtype or torch.float32 {allowed}, got {named[name].dtype}")
    _validate.nonempty(named, "batch, heads or head dims", (b, h, kd, vd), ("q", "v"))
    if kd > MAX_K:
        raise ValueError(f"K = {kd} is wider than the {MAX_K} key columns a program keeps in registers: "
                         f"{_validate.shapes_of(named, ('q', 'v'))}")


def _check_step(q, k, v, alpha, beta, state, out_state) -> None:
    named = dict(q=q, k=k, v=v, alpha=alpha, beta=beta, state=state)
    if out_state is not None:
        named["out_state"] = out_state
    _validate.tensors(named)
    _validate.ndims(named, dict(q=3, k=3, v=3, alpha=2, beta=2, state=4, out_state=4))
    b, h, kd = q.shape
    vd = v.shape[2]
    _validate.shapes(named, dict(k=(b, h, kd), v=(b, h, vd), alpha=(b, h), beta=(b, h), state=(b, h, kd, vd),
                                 out_state=(b, h, kd, vd)), ("q", "v"))
    _validate.dtypes(named, dict(out_state="state"))
    _check_common(named, ("alpha", "beta"), b, h, kd, vd)


def _check_chunked(q, k, v, g, beta, state) -> None:
    dims = _validate.op_inputs(GDN_PREFILL, (q, k, v, g, beta, state))
    if dims["K"] > MAX_K:
        raise _validate.KernelInputError(f"K = {dims['K']} is wider than the {MAX_K} key columns a program keeps "
                                         f"in registers: q {list(q.shape)}")


def _block(n: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def _step(q, k, v, alpha, beta, state, out_state, block_v: int):
    _check_step(q, k, v, alpha, beta, state, out_state)
    b, h, kd = q.shape
    vd = v.shape[2]
    block_v = min(block_v, _block(vd))
    o = torch.empty(b, h, vd, device=q.device, dtype=q.dtype)
    vhat = torch.empty_like(o)
    new_state = torch.empty_like(state) if out_state is None else out_state
    _gdn_step_kernel[(b * h, triton.cdiv(vd, block_v))](
        q, k, v, alpha, beta, state, o, vhat, new_state,
        h, kd, vd, 1.0 / math.sqrt(kd),
        *q.stride(), *k.stride(), *v.stride(), *alpha.stride(), *beta.stride(), *state.stride(),
        *o.stride(), *vhat.stride(), *new_state.stride(),
        BLOCK_K=_block(kd), BLOCK_V=block_v, num_warps=NUM_WARPS, num_stages=STEP_STAGES,
    )
    return o, vhat, new_state


def _chunked(q, k, v, g, beta, state, chunk: int, block_v: int):
    _check_chunked(q, k, v, g, beta, state)
    b, t, h, kd = q.shape
    vd = v.shape[3]
    blocks = chunked_blocks(kd, vd, block_v)
    o = torch.empty(b, t, h, vd, device=q.device, dtype=q.dtype)
    vhat = torch.empty_like(o)
    final = torch.empty_like(state)
    _gdn_chunked_kernel[chunked_grid({"B": b, "H": h, "V": vd}, block_v=blocks["BLOCK_V"])](
        q, k, v, g, beta, state, o, vhat, final,
        t, h, kd, vd, 1.0 / math.sqrt(kd),
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *state.stride(),
        *o.stride(), *vhat.stride(), *final.stride(),
        BT=chunk, **blocks, num_warps=NUM_WARPS, num_stages=CHUNK_STAGES,
    )
    return o, vhat, final


def gdn_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             state: torch.Tensor, out_state: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule; see ``reference.gdn_step``.

    Args:
        q, k: [B, H, K]; v: [B, H, V]; alpha, beta: [B, H]; state: [B, H, K, V] = S_{t-1}.
        q, k, v share one dtype (float16, bfloat16 or float32); alpha, beta and state are in that dtype or float32.
        out_state: optional [B, H, K, V] in state's dtype to write S_t into; ``state`` itself updates in place.
        Any strides.

    Returns:
        o: [B, H, V] = (q^T S_t) / sqrt(K) and vhat: [B, H, V] = alpha * (k^T S_{t-1}), in q's dtype; new_state:
        S_t in state's dtype (``out_state`` when given, else a new tensor).

    Raises:
        ValueError: on a wrong shape, dtype or device mix, or K > 256.
    """
    return _step(q, k, v, alpha, beta, state, out_state, STEP_BLOCK_V)


def gdn_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated delta rule over T tokens in chunks of 32; see ``reference.gdn_chunked`` and ``gdn_recurrent``.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log-decay (alpha = exp(g), finite); beta: [B, T, H];
        state: [B, H, K, V] initial state (not modified). All in one float dtype (float16, bfloat16 or float32), as
        the op's spec says. Any strides; T >= 1.

    Returns:
        o: [B, T, H, V] and vhat: [B, T, H, V] in q's dtype; the final state [B, H, K, V] in state's dtype.

    Raises:
        InputError: (a ValueError) on inputs outside the op's preconditions (ham_export.ops.spec.GDN_PREFILL), or
        K > 256.
    """
    return _chunked(q, k, v, g, beta, state, CHUNK, CHUNK_BLOCK_V)
