"""Prefill Triton kernels for ``cache_attention`` with any number of new tokens: routed-key compaction and sparse
causal flash attention.

Reference: :func:`ham_export.ops.reference.cache_attention` (same arguments, same order, same names), which masks
the dense [T, C + T] logits through :func:`ham_export.ops.reference.routed_attention`.

``compact_routed``: one program per batch row (grid ``(B,)``) walks ``routed`` in blocks of ``COMPACT_BLOCK`` (1024)
tokens, takes a ``tl.cumsum`` of each block and carries the running total across blocks, so that the routed
positions land in order at the front of the row of ``index`` [B, T] int32; a second pass over the row writes -1 past
the ``count`` [B] int32 routed tokens. ``num_warps`` 4.

``prefill_attention``: one program per (batch x head, block of ``BLOCK_T`` (64) queries) (grid
``(B * H, cdiv(T, BLOCK_T))``). It keeps a flash-attention online softmax in fp32 over (a) the cache in blocks of
``BLOCK_C`` (32) entries up to ``length`` (masked loads, so entries past ``length`` are never read) and (b)
the compacted routed new tokens, gathered through ``index`` in blocks of ``BLOCK_S`` (32) keys with the causal mask
``index[j] <= t``. Positions in ``index`` are sorted, so the walk over (b) stops at the first block whose smallest
position is past the block's last query: only the routed keys up to that query are read, and the cost follows the
fill, not T^2. ``num_warps`` 4, ``num_stages`` 2. Head dims and blocks are padded (masked) to at least 16, the
smallest ``tl.dot`` shape.

Arithmetic: q . k runs through ``tl.dot`` on the inputs' dtype with fp32 accumulation (exact products for fp16 and
bf16; bf16 is upcast first under the interpreter, see ``_INTERPRETED``), then is multiplied by the head's scale, as
the reference does; softmax, weights and values are fp32. The dots on fp32 operands (q . k for fp32 inputs, weights
. values always) use ``input_precision="tf32x3"`` (``DOT_PRECISION``): three TF32 tensor-core products, close to
fp32 accuracy, never plain TF32. IEEE fp32 dots lower to FMA loops without tensor cores that spill at these blocks
for fp32 inputs (ptxas for sm_90: about 4 KB per thread at head dim 64, 0.7 KB at 32), while with 3xTF32 ptxas
reports no spills for fp32 up to head dim 64, 8 bytes for fp16/bf16 at head dim 128, and about 2 KB for fp32 at 128.
Configs are pinned; nothing is autotuned. Tested under the interpreter and compiled for sm_90; not yet run on a GPU.

A row whose ``length`` lies outside [0, C] is refused in the kernel, as the op's spec says for device kernels: no
cache entry of it is read and its outputs are NaN. The launcher also checks the lengths on the host when they live
on the CPU (under the interpreter) and raises there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ham_export.ops.spec import CACHE_ATTENTION

from . import _validate

COMPACT_BLOCK = 1024  # tokens per block of the compaction's prefix sum
BLOCK_T = 64  # queries per program
BLOCK_C = 32  # cache entries per block
BLOCK_S = 32  # compacted routed keys per block
NUM_WARPS = 4
NUM_STAGES = 2
DOT_PRECISION = "tf32x3"  # fp32 operands: three TF32 tensor-core products, close to fp32 (see above)
MIN_DOT = 16  # the smallest tl.dot dimension the compiler accepts


@triton.jit
def _compact_routed_kernel(
    routed_ptr, index_ptr, count_ptr,
    T,
    sr_b, sr_t, si_b, si_t,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    r_base = routed_ptr + b * sr_b
    i_base = index_ptr + b * si_b
    total = tl.zeros((), tl.int32)
    for start in range(0, T, BLOCK):
        pos = start + offs
        inside = pos < T
        r = (tl.load(r_base + pos * sr_t, mask=inside, other=0) != 0).to(tl.int32)
        slot = total + tl.cumsum(r, axis=0) - 1
        tl.store(i_base + slot * si_t, pos.to(index_ptr.dtype.element_ty), mask=inside & (r != 0))
        total += tl.sum(r, axis=0)
    for start in range(0, T, BLOCK):
        pos = start + offs
        tl.store(i_base + pos * si_t, tl.full((BLOCK,), -1, index_ptr.dtype.element_ty),
                 mask=(pos < T) & (pos >= total))
    tl.store(count_ptr + b, total.to(count_ptr.dtype.element_ty))


@triton.jit
def _online_softmax(m, l_sum, acc, logits, vt, DOT_PRECISION: tl.constexpr):
    """One block of keys into the running max ``m``, weight sum ``l_sum`` and weighted values ``acc`` of each query
    (logits [BLOCK_T, n] with -inf where a key is not seen; vt [n, BLOCK_V])."""
    m_new = tl.maximum(m, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(logits - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=DOT_PRECISION)
    return m_new, l_sum * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _new_keys(m, l_sum, acc, q, scale, k_base, v_base, pos, valid, offs_t, offs_k, offs_v, mask_k, mask_v,
              sk_t, sk_k, sv_t, sv_v, DOT_PRECISION: tl.constexpr, QK_FP32: tl.constexpr):
    """One block of new keys at positions ``pos`` (``valid``: routed and inside), each seen by the queries at or
    after it, into the online softmax."""
    kt = tl.load(k_base + pos[None, :] * sk_t + offs_k[:, None] * sk_k, mask=valid[None, :] & mask_k[:, None],
                 other=0.0)
    if QK_FP32:
        kt = kt.to(tl.float32)
    logits = scale * tl.dot(q, kt, input_precision=DOT_PRECISION)
    logits = tl.where(valid[None, :] & (pos[None, :] <= offs_t[:, None]), logits, float("-inf"))
    vt = tl.load(v_base + pos[:, None] * sv_t + offs_v[None, :] * sv_v, mask=valid[:, None] & mask_v[None, :],
                 other=0.0).to(tl.float32)
    return _online_softmax(m, l_sum, acc, logits, vt, DOT_PRECISION)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, length_ptr, k_ptr, v_ptr, index_ptr, count_ptr, scale_ptr, out_ptr,
    H, T, C, K, V,
    sq_b, sq_h, sq_t, sq_k,
    skc_b, skc_h, skc_c, skc_k,
    svc_b, svc_h, svc_c, svc_v,
    sk_b, sk_h, sk_t, sk_k,
    sv_b, sv_h, sv_t, sv_v,
    si_b, si_t,
    so_b, so_h, so_t, so_v,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_FP32: tl.constexpr,
    COMPACTED: tl.constexpr = True,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: a large cache passes 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mask_t = offs_t < T
    mask_k = offs_k < K
    mask_v = offs_v < V
    last_t = tl.minimum(pid_t * BLOCK_T + BLOCK_T, T) - 1

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_t[:, None] * sq_t + offs_k[None, :] * sq_k,
                mask=mask_t[:, None] & mask_k[None, :], other=0.0)
    if QK_FP32:
        q = q.to(tl.float32)
    scale = tl.load(scale_ptr + h).to(tl.float32)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)

    # (a) the cache, [0, length): every query of the block sees all of it; a refused row reads none of it.
    length = tl.load(length_ptr + b)
    valid_length = (length >= 0) & (length <= C)
    end = tl.where(valid_length, length, 0).to(tl.int32)
    kc_base = k_cache_ptr + b * skc_b + h * skc_h
    vc_base = v_cache_ptr + b * svc_b + h * svc_h
    for start in range(0, end, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        valid = offs_c < end
        kt = tl.load(kc_base + offs_c[None, :] * skc_c + offs_k[:, None] * skc_k,
                     mask=valid[None, :] & mask_k[:, None], other=0.0)
        if QK_FP32:
            kt = kt.to(tl.float32)
        logits = scale * tl.dot(q, kt, input_precision=DOT_PRECISION)
        logits = tl.where(valid[None, :], logits, float("-inf"))
        vt = tl.load(vc_base + offs_c[:, None] * svc_c + offs_v[None, :] * svc_v,
                     mask=valid[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        m, l_sum, acc = _online_softmax(m, l_sum, acc, logits, vt, DOT_PRECISION)

    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    i_base = index_ptr + b * si_b
    if COMPACTED:
        # (b) the routed new tokens at sorted positions index[0, count): query t sees those at positions <= t.
        count = tl.load(count_ptr + b).to(tl.int32)
        start = 0
        first = tl.load(i_base, mask=count > 0, other=T).to(tl.int32)  # T: past every query
        while first <= last_t:
            offs_s = start + tl.arange(0, BLOCK_S)
            valid = offs_s < count
            pos = tl.load(i_base + offs_s * si_t, mask=valid, other=T).to(tl.int32)
            m, l_sum, acc = _new_keys(m, l_sum, acc, q, scale, k_base, v_base, pos, valid, offs_t, offs_k,
                                      offs_v, mask_k, mask_v, sk_t, sk_k, sv_t, sv_v, DOT_PRECISION, QK_FP32)
            start += BLOCK_S
            first = tl.load(i_base + start * si_t, mask=start < count, other=T).to(tl.int32)
    else:
        # (b) without compaction (one launch, as a TensorRT plugin): index_ptr is routed itself, and the walk
        # takes every new token up to the block's last query, masked where it is not routed.
        for start in range(0, last_t + 1, BLOCK_S):
            pos = start + tl.arange(0, BLOCK_S)
            inside = pos <= last_t
            valid = inside & (tl.load(i_base + pos * si_t, mask=inside, other=0) != 0)
            m, l_sum, acc = _new_keys(m, l_sum, acc, q, scale, k_base, v_base, pos, valid, offs_t, offs_k,
                                      offs_v, mask_k, mask_v, sk_t, sk_k, sv_t, sv_v, DOT_PRECISION, QK_FP32)

    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    out = tl.where(valid_length, out, float("nan"))
    tl.store(out_ptr + b * so_b + h * so_h + offs_t[:, None] * so_t + offs_v[None, :] * so_v,
             out.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def cache_attention_trt(
    q_ptr, k_cache_ptr, v_cache_ptr, length_ptr, k_ptr, v_ptr, routed_ptr, scale_ptr,
    H, T, C, K, V,
    o_ptr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_FP32: tl.constexpr,
):
    """The attention in TensorRT's plugin ABI: the op's inputs, its sizes as int32 scalars, the output; contiguous
    tensors (strides from the sizes, in int64), routed as int32. One launch (a plugin has no workspace for the
    compaction pass): the walk over the new tokens takes them all up to each block's last query, masked by routed,
    so it costs T^2 / 2 key reads per head where the compacted walk of :func:`prefill_attention` costs the fill."""
    h, t, c, k, v = H.to(tl.int64), T.to(tl.int64), C.to(tl.int64), K.to(tl.int64), V.to(tl.int64)
    _prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, length_ptr, k_ptr, v_ptr, routed_ptr, routed_ptr, scale_ptr, o_ptr,
        H, T, C, K, V,
        h * t * k, t * k, k, 1,
        h * c * k, c * k, k, 1,
        h * c * v, c * v, v, 1,
        h * t * k, t * k, k, 1,
        h * t * v, t * v, v, 1,
        t, 1,
        h * t * v, t * v, v, 1,
        BLOCK_T, BLOCK_C, BLOCK_S, BLOCK_K, BLOCK_V, DOT_PRECISION, QK_FP32, False,
    )


def grid(dims, cdiv=triton.cdiv, block_t: int = BLOCK_T) -> tuple:
    """The attention kernel's grid, from the sizes of the op's shape letters (ints, or TensorRT's shape
    expressions)."""
    return (dims["B"] * dims["H"], cdiv(dims["T"], block_t))


def head_blocks(kd: int, vd: int) -> dict[str, int]:
    """BLOCK_K and BLOCK_V: the head widths padded to a power of two, at least the smallest tl.dot size."""
    return dict(BLOCK_K=max(MIN_DOT, triton.next_power_of_2(kd)), BLOCK_V=max(MIN_DOT, triton.next_power_of_2(vd)))


# The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits (triton 3.7.1): under it, bf16 q and
# k are upcast to fp32 before the dot (a product of two bf16 values is exact in fp32: only the order of the sums can
# differ from the bf16 dot compiled for the GPU).
_INTERPRETED = isinstance(_prefill_attention_kernel, InterpretedFunction)


def _check_routed(routed) -> None:
    if not isinstance(routed, torch.Tensor) or routed.dim() != 2 or routed.dtype != torch.bool:
        raise _validate.KernelInputError(f"routed must be a 2-d bool tensor, got "
                                         f"{list(getattr(routed, 'shape', []))} {getattr(routed, 'dtype', routed)}")


def _compact(routed: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_routed(routed)
    b, t = routed.shape
    index = torch.empty(b, t, device=routed.device, dtype=torch.int32)
    count = torch.empty(b, device=routed.device, dtype=torch.int32)
    if b == 0:
        return index, count
    _compact_routed_kernel[(b,)](
        routed.view(torch.uint8), index, count,
        t,
        *routed.stride(), *index.stride(),
        BLOCK=block, num_warps=NUM_WARPS,
    )
    return index, count


def compact_routed(routed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the routed tokens of each row, in order.

    Args:
        routed: [B, T] bool; any strides.

    Returns:
        index: [B, T] int32, row b holding the positions s with routed[b, s] in increasing order in its first
        count[b] entries and -1 after them; count: [B] int32 routed tokens per row.

    Raises:
        ValueError: on a routed that is not a 2-d bool tensor.
    """
    return _compact(routed, COMPACT_BLOCK)


def _check(q, k_cache, v_cache, length, k, v, routed, scale, values: bool | None = None) -> None:
    _validate.op_inputs(CACHE_ATTENTION, (q, k_cache, v_cache, length, k, v, routed, scale), values=values)


def _prefill(q, k_cache, v_cache, length, k, v, routed, scale, block_t: int, block_c: int, block_s: int,
             compact_block: int, values: bool | None = None) -> torch.Tensor:
    _check(q, k_cache, v_cache, length, k, v, routed, scale, values)
    b, h, t, kd = q.shape
    c, vd = k_cache.shape[2], v_cache.shape[3]
    index, count = _compact(routed, compact_block)
    out = torch.empty(b, h, t, vd, device=q.device, dtype=q.dtype)
    _prefill_attention_kernel[grid({"B": b, "H": h, "T": t}, block_t=block_t)](
        q, k_cache, v_cache, length, k, v, index, count, scale, out,
        h, t, c, kd, vd,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        *index.stride(), *out.stride(),
        BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_S=block_s,
        **head_blocks(kd, vd), DOT_PRECISION=DOT_PRECISION, QK_FP32=q.dtype == torch.bfloat16 and _INTERPRETED,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Attention of T new tokens over the cache plus the routed new tokens up to each query; see
    ``reference.cache_attention``.

    Args:
        q: [B, H, T, K]; k_cache: [B, H, C, K]; v_cache: [B, H, C, V]; length: [B] int64 valid entries (0 to C);
        k: [B, H, T, K], v: [B, H, T, V] the new tokens' keys and values; routed: [B, T] bool; scale: [H]. Query t
        sees cache entries [0, length) and new token s iff routed[s] and s <= t. The float inputs share one dtype
        (float16, bfloat16 or float32); any strides; any T >= 1.

    Returns:
        [B, H, T, V] in q's dtype (0 for a query that sees no key; NaN for a row the kernel refused for a length
        outside [0, C]).

    Raises:
        InputError: (a ValueError) on inputs outside the op's preconditions.
    """
    return _prefill(q, k_cache, v_cache, length, k, v, routed, scale, BLOCK_T, BLOCK_C, BLOCK_S, COMPACT_BLOCK)
