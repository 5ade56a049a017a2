"""Flash-decoding Triton kernels for ``cache_attention`` with one new token (T = 1, decode).

Reference: :func:`ham_export.ops.reference.cache_attention` (same arguments, same order, same names).

The cache is cut into ``num_splits`` contiguous spans of ``split`` entries (a multiple of ``BLOCK_C``); one program
per (batch, head, span) walks its span in blocks of ``BLOCK_C`` up to the entry's valid ``length`` (masked loads, so
entries past ``length`` are never read) and writes a partial running max, sum of weights and weighted value sum. A
second kernel, one program per (batch, head), combines the partials with the new token (iff routed) and divides. All
arithmetic is fp32 whatever the input dtype. Configs are pinned; nothing is autotuned.

A row whose ``length`` lies outside [0, C] is refused in the kernel, as the op's spec says for device kernels: no
cache entry of it is read and its output is NaN. The launcher also checks the lengths on the host when they live on
the CPU (under the interpreter) and raises there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ham_export.ops.spec import CACHE_ATTENTION

from . import _validate

BLOCK_C = 64  # cache entries per block
MAX_SPLITS = 16  # most spans (programs) per (batch, head)


@triton.jit
def _cache_attention_partial_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, length_ptr, scale_ptr,
    m_ptr, l_ptr, acc_ptr,
    H, C, K, V, split, num_splits,
    sq_b, sq_h, sq_k,
    skc_b, skc_h, skc_c, skc_k,
    svc_b, svc_h, svc_c, svc_v,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mask_k = offs_k < K
    mask_v = offs_v < V
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_k * sq_k, mask=mask_k, other=0.0).to(tl.float32)
    q = q * tl.load(scale_ptr + h).to(tl.float32)
    length = tl.load(length_ptr + b)
    start = pid_s * split
    length_ok = (length >= 0) & (length <= C)  # a refused row reads nothing
    end = tl.where(length_ok, tl.minimum(start + split, length), start)
    n_blocks = tl.cdiv(tl.maximum(end - start, 0), BLOCK_C)

    m = tl.full((), float("-inf"), tl.float32)
    l_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    kc_base = k_cache_ptr + b * skc_b + h * skc_h
    vc_base = v_cache_ptr + b * svc_b + h * svc_h
    for i in range(0, n_blocks):
        offs_c = start + i * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = offs_c < end
        kt = tl.load(kc_base + offs_c[:, None] * skc_c + offs_k[None, :] * skc_k,
                     mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        logits = tl.sum(kt * q[None, :], axis=1)
        logits = tl.where(valid, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(logits - m_safe)
        alpha = tl.exp(m - m_safe)
        vt = tl.load(vc_base + offs_c[:, None] * svc_c + offs_v[None, :] * svc_v,
                     mask=valid[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new

    part = pid_bh * num_splits + pid_s
    tl.store(m_ptr + part, m)
    tl.store(l_ptr + part, l_sum)
    tl.store(acc_ptr + part * BLOCK_V + offs_v, acc)


@triton.jit
def _cache_attention_combine_kernel(
    m_ptr, l_ptr, acc_ptr, q_ptr, k_ptr, v_ptr, routed_ptr, scale_ptr, length_ptr, out_ptr,
    H, C, K, V, num_splits,
    sq_b, sq_h, sq_k,
    sk_b, sk_h, sk_k,
    sv_b, sv_h, sv_v,
    so_b, so_h, so_v,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mask_s = offs_s < num_splits
    mask_k = offs_k < K
    mask_v = offs_v < V
    part = pid_bh * num_splits + offs_s
    m = tl.load(m_ptr + part, mask=mask_s, other=float("-inf"))
    l_sum = tl.load(l_ptr + part, mask=mask_s, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * BLOCK_V + offs_v[None, :], mask=mask_s[:, None], other=0.0)

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_k * sq_k, mask=mask_k, other=0.0).to(tl.float32)
    kn = tl.load(k_ptr + b * sk_b + h * sk_h + offs_k * sk_k, mask=mask_k, other=0.0).to(tl.float32)
    vn = tl.load(v_ptr + b * sv_b + h * sv_h + offs_v * sv_v, mask=mask_v, other=0.0).to(tl.float32)
    routed = tl.load(routed_ptr + b) != 0
    new_logit = tl.load(scale_ptr + h).to(tl.float32) * tl.sum(q * kn, axis=0)
    new_logit = tl.where(routed, new_logit, float("-inf"))

    top = tl.maximum(tl.max(m, axis=0), new_logit)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)
    p_new = tl.exp(new_logit - top)
    total = tl.sum(l_sum * w, axis=0) + p_new
    num = tl.sum(acc * w[:, None], axis=0) + p_new * vn
    out = num / tl.where(total > 0, total, 1.0)
    length = tl.load(length_ptr + b)
    out = tl.where((length >= 0) & (length <= C), out, float("nan"))  # a refused row
    tl.store(out_ptr + b * so_b + h * so_h + offs_v * so_v, out.to(out_ptr.dtype.element_ty), mask=mask_v)


def _check(q, k_cache, v_cache, length, k, v, routed, scale, values: bool | None = None) -> None:
    dims = _validate.op_inputs(CACHE_ATTENTION, (q, k_cache, v_cache, length, k, v, routed, scale), values=values)
    if dims["T"] != 1:
        raise _validate.KernelInputError(f"cache_attention_decode handles one new token (T = 1); q has shape "
                                         f"{list(q.shape)}")


def _decode(q, k_cache, v_cache, length, k, v, routed, scale, block_c: int, max_splits: int,
            values: bool | None = None) -> torch.Tensor:
    _check(q, k_cache, v_cache, length, k, v, routed, scale, values)
    b, h, _, kd = q.shape
    c, vd = k_cache.shape[2], v_cache.shape[3]
    n_blocks = max(1, triton.cdiv(c, block_c))
    num_splits = min(max_splits, n_blocks)
    split = triton.cdiv(n_blocks, num_splits) * block_c
    num_splits = max(1, triton.cdiv(c, split))
    block_k, block_v = triton.next_power_of_2(kd), triton.next_power_of_2(vd)
    dev = q.device
    m = torch.empty(b * h * num_splits, device=dev, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h * num_splits, block_v, device=dev, dtype=torch.float32)
    out = torch.empty(b, h, 1, vd, device=dev, dtype=q.dtype)
    _cache_attention_partial_kernel[(b * h, num_splits)](
        q, k_cache, v_cache, length, scale, m, l_sum, acc,
        h, c, kd, vd, split, num_splits,
        q.stride(0), q.stride(1), q.stride(3),
        *k_cache.stride(), *v_cache.stride(),
        BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    _cache_attention_combine_kernel[(b * h,)](
        m, l_sum, acc, q, k, v, routed.view(torch.uint8), scale, length, out,
        h, c, kd, vd, num_splits,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(3),
        v.stride(0), v.stride(1), v.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return out


def cache_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over the cache plus itself iff routed; see ``reference.cache_attention``.

    Args:
        q: [B, H, 1, K]; k_cache: [B, H, C, K]; v_cache: [B, H, C, V]; length: [B] int64 valid entries (0 to C);
        k: [B, H, 1, K], v: [B, H, 1, V] the new token's key and value; routed: [B, 1] bool; scale: [H].
        The float inputs share one dtype (float16, bfloat16 or float32); any strides.

    Returns:
        [B, H, 1, V] in q's dtype (0 for a query that sees no key; NaN for a row the kernel refused for a length
        outside [0, C]).

    Raises:
        InputError: (a ValueError) on inputs outside the op's preconditions, or T != 1.
    """
    return _decode(q, k_cache, v_cache, length, k, v, routed, scale, BLOCK_C, MAX_SPLITS)
