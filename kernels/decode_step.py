"""The cache side of one HAM decode token for one layer, on device: score, route, attend, append.

References: :func:`ham_export.ops.reference.surprise` and :func:`~ham_export.ops.reference.route` (the score and the
route decision, as ``HAMLayer._score`` composes them), :func:`~ham_export.ops.reference.cache_attention` over the
cache as it stood, then :func:`~ham_export.ops.reference.cache_append` (see ``HAMLayer._with_state``).

:func:`decode_step_` launches four kernels on one stream, with no host synchronisation between them:

1. ``_score_route_kernel``, one program per batch row (grid ``(B,)``, ``num_warps=4``, one [H, V] tile): the cosine
   router's score min over heads of 1 - cos(vhat, v) in fp32 (IEEE square root and division), rounded to the score
   dtype, or the given score of a learned router; then routed = score >= tau, with tau rounded to the score dtype
   as the model does, written as uint8 0 / 1 into a [B, 1] buffer;
2. and 3. the flash-decoding partial and combine kernels of :mod:`kernels.cache_attention` (their pinned configs),
   which read that buffer for the new token's route and read the cache before anything writes it;
4. ``_cache_append_kernel`` of :mod:`kernels.cache_append` (its pinned configs), which stores the token in place
   under the overflow policy and updates ``length``.

Nothing is autotuned: the last kernel writes the cache in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ham_export.ops.reference import COS_EPS
from ham_export.ops.spec import FLOAT_DTYPES, POLICIES

from . import _validate
from . import cache_append as _append
from . import cache_attention as _attention

NUM_WARPS = 4


@triton.jit
def _score_route_kernel(
    vhat_ptr, v_ptr, tau_ptr, score_ptr, routed_ptr,
    H, V,
    svh_b, svh_h, svh_v,
    sv_b, sv_h, sv_v,
    ss_b,
    COSINE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, EPS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if COSINE:
        offs_h = tl.arange(0, BLOCK_H)
        offs_v = tl.arange(0, BLOCK_V)
        mask_h = offs_h < H
        mask = mask_h[:, None] & (offs_v < V)[None, :]
        vh = tl.load(vhat_ptr + b * svh_b + offs_h[:, None] * svh_h + offs_v[None, :] * svh_v, mask=mask,
                     other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + b * sv_b + offs_h[:, None] * sv_h + offs_v[None, :] * sv_v, mask=mask,
                     other=0.0).to(tl.float32)
        dot = tl.sum(vh * vv, axis=1)
        norms = tl.sqrt_rn(tl.sum(vh * vh, axis=1)) * tl.sqrt_rn(tl.sum(vv * vv, axis=1))
        cos = tl.div_rn(dot, tl.maximum(norms, EPS))
        e = 1.0 - tl.minimum(tl.maximum(cos, -1.0), 1.0)
        score = tl.min(tl.where(mask_h, e, float("inf")), axis=0).to(score_ptr.dtype.element_ty)
        tl.store(score_ptr + b * ss_b, score)
    else:
        score = tl.load(score_ptr + b * ss_b)
    tau = tl.load(tau_ptr).to(score_ptr.dtype.element_ty)
    tl.store(routed_ptr + b, (score >= tau).to(tl.uint8))


def _check(q, k, v, vhat, k_cache, v_cache, score_cache, length, tau, scale, policy, score) -> None:
    """What the two sibling modules' checks do not cover: vhat, tau, the given score's shape, the policy."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if score is None and not isinstance(vhat, torch.Tensor):
        raise ValueError("vhat must be a torch.Tensor, got "
                         f"{type(vhat).__name__} (vhat is needed when no score is given)")
    named = dict(q=q, v=v, score_cache=score_cache, tau=tau)
    named.update(dict(vhat=vhat) if score is None else dict(score=score))
    _validate.tensors(named)
    _validate.ndims(named, dict(q=4, v=4, score_cache=2))
    _validate.shapes(named, dict(vhat=tuple(v.shape), score=(q.shape[0], 1)), ("q", "v"))  # the one named holds
    _validate.dtypes(named, dict(vhat="v"))
    if tau.dim() > 1 or tau.numel() != 1:
        raise ValueError(f"tau must be a 0-dim or [1] tensor, got shape {tuple(tau.shape)}")
    if tau.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise ValueError(f"tau must be a floating-point tensor, got {tau.dtype}")


def decode_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vhat: torch.Tensor | None,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, score_cache: torch.Tensor, length: torch.Tensor,
                 tau: torch.Tensor, scale: torch.Tensor, policy: str, score: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache side of one decode token: score, route, attention over the cache as it stood, append in place.

    Args:
        q, k: [B, H, 1, K] the new token's (unit) query and key; v, vhat: [B, H, 1, V] its value and the GDN's
        prediction of it (vhat may be None when ``score`` is given); k_cache: [B, H, C, K]; v_cache: [B, H, C, V];
        score_cache: [B, C]; length: [B] int64 (0 <= length <= C); these four are updated in place.
        tau: 0-dim or [1] float tensor, the threshold; scale: [H] the attention logit scale; policy: ``drop`` or
        ``evict`` (what the token does at a full cache, see ``reference.cache_append``).
        score: None for the cosine router (score = min over heads of ``reference.surprise(vhat, v)`` in fp32,
        rounded to score_cache's dtype), or the learned router's [B, 1] score in score_cache's dtype.
        q, k, v, vhat, k_cache, v_cache share one dtype (float16, bfloat16 or float32); any strides.

    Returns:
        o: [B, H, 1, V] in q's dtype, ``reference.cache_attention`` over the cache as it stood plus the token iff
        routed; score: [B, 1] (the given tensor when one is given); routed: [B, 1] bool = score >= tau (tau rounded
        to the score's dtype); overflow: [B] int64 (1 where the routed token found the cache full).

    Raises:
        ValueError: on a wrong shape, dtype, device mix or policy; checked before any kernel runs, so a refused
        call leaves the cache as it was.
    """
    _check(q, k, v, vhat, k_cache, v_cache, score_cache, length, tau, scale, policy, score)
    b, h, dev = q.shape[0], q.shape[1], q.device
    cosine = score is None
    if cosine:
        score = torch.empty(b, 1, device=dev, dtype=score_cache.dtype)
    routed_u8 = torch.empty(b, 1, device=dev, dtype=torch.uint8)
    routed = routed_u8.view(torch.bool)
    _attention._check(q, k_cache, v_cache, length, k, v, routed, scale)
    _append._check(k_cache, v_cache, score_cache, length, k, v, score, routed, policy)

    vd = v.shape[3]
    src = vhat if cosine else v  # not read without the cosine router
    _score_route_kernel[(b,)](
        src, v, tau, score, routed_u8,
        h, vd,
        src.stride(0), src.stride(1), src.stride(3),
        v.stride(0), v.stride(1), v.stride(3),
        score.stride(0),
        COSINE=cosine, BLOCK_H=triton.next_power_of_2(h), BLOCK_V=triton.next_power_of_2(vd), EPS=COS_EPS,
        num_warps=NUM_WARPS,
    )
    o = _attention.cache_attention_decode(q, k_cache, v_cache, length, k, v, routed, scale)
    overflow = torch.empty_like(length)
    _append._launch(k_cache, v_cache, score_cache, length, k, v, score, routed_u8, overflow, policy == "evict")
    return o, score, routed, overflow


def min_bytes(b: int, h: int, length_total: int, k: int, v: int, dtype: torch.dtype, appended: int | None = None,
              cosine: bool = True) -> int:
    """The fewest bytes of device memory one :func:`decode_step_` must move, for a bandwidth figure.

    Args:
        b, h, k, v: batch, heads, key and value widths; length_total: the cache entries valid before the step,
        summed over the batch; dtype: the cache dtype; appended: the rows whose token is stored (default b, every
        row: tau <= 0); cosine: whether vhat is read (the cosine router).

    Returns:
        (cache entries read + entries written) * h * (k + v) elements, plus the new token's q, k, v (and vhat)
        read and o written, in bytes of ``dtype``. The per-row scalars (score, route, length, overflow) are left
        out: a few bytes per row.
    """
    appended = b if appended is None else appended
    per_token = 2 * k + (3 if cosine else 2) * v  # q, k, v, (vhat,) o
    return dtype.itemsize * h * ((length_total + appended) * (k + v) + b * per_token)
