"""Triton kernel for ``cache_append``: store a call's routed tokens in a fixed-capacity KV cache, in place.

Reference: :func:`ham_export.ops.reference.cache_append` (same arguments, same order, same names; the results are equal
bit for bit, since the kernel only moves data).

``_cache_append_kernel`` runs one program per batch row (grid ``(B,)``, ``num_warps=4``) and walks the T new tokens
in blocks of ``BLOCK_T = min(32, next_power_of_2(T))`` (1 in decode): a prefix sum of ``routed`` (``tl.cumsum``,
carried from block to block) gives each routed token its slot ``length + count - 1``; the tokens whose slot is below
C are written in parallel, their score and, head by head, their key and value row. Under ``evict`` (``EVICT``, a
constexpr), and only when the row overflows, the tokens that found the cache full are then taken one at a time, in
order: an argmin over the keys of ``score_cache[b, :C]`` (each score rounded to the grid of ``spec.EVICT_GRID``) in
blocks of ``BLOCK_C = min(256, next_power_of_2(C))`` finds the first lowest entry, which a strictly higher key
replaces (a NaN in the row, or a NaN score, replaces nothing: ``torch.argmin`` takes a NaN as the lowest and no
score is above it). A barrier separates each write from the reads
that follow it (other threads of the program read what one thread wrote), and one more precedes the last step:
``length`` becomes ``min(length + routed, C)`` and ``overflow`` ``max(length + routed - C, 0)``. Configs are pinned,
never autotuned: the kernel writes the cache in place.

A row whose ``length`` lies outside [0, C] is refused in the kernel, as the op's spec says for device kernels
(:data:`ham_export.ops.spec.CACHE_APPEND`): nothing of it is written, its length stays, its overflow is -1. The
launchers also check the lengths on the host when they live on the CPU (under the interpreter) and raise there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ham_export.ops.spec import CACHE_APPEND, EVICT_GRID, INVALID_LENGTH

from . import _validate

BLOCK_T = 32  # most new tokens per block
GRID = tl.constexpr(float(EVICT_GRID))  # eviction compares keys floor(score * GRID + 0.5) (spec.EVICT_GRID)
BLOCK_C = 256  # most cache entries per block of the eviction argmin
NUM_WARPS = 4


@triton.jit
def _cache_append_kernel(
    k_cache_ptr, v_cache_ptr, score_cache_ptr, length_ptr,
    k_ptr, v_ptr, score_ptr, routed_ptr, new_length_ptr, overflow_ptr,
    H, C, T, K, V,
    skc_b, skc_h, skc_c, skc_k,
    svc_b, svc_h, svc_c, svc_v,
    ssc_b, ssc_c,
    sk_b, sk_h, sk_t, sk_k,
    sv_b, sv_h, sv_t, sv_v,
    ss_b, ss_t,
    sr_b, sr_t,
    EVICT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, INVALID: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mask_k = offs_k < K
    mask_v = offs_v < V
    kc_row = k_cache_ptr + b * skc_b
    vc_row = v_cache_ptr + b * svc_b
    sc_row = score_cache_ptr + b * ssc_b
    k_row = k_ptr + b * sk_b
    v_row = v_ptr + b * sv_b
    length = tl.load(length_ptr + b)
    valid = (length >= 0) & (length <= C)  # a length outside [0, C] is refused: the row is left as it is

    # The tokens that fit, in parallel within a block of BLOCK_T tokens.
    count = length * 0  # routed tokens before the block
    for t0 in range(0, tl.where(valid, T, 0), BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        routed = tl.load(routed_ptr + b * sr_b + offs_t * sr_t, mask=offs_t < T, other=0) != 0
        slot = length + count + tl.cumsum(routed.to(tl.int32), axis=0) - 1
        fits = routed & (slot < C)
        s = tl.load(score_ptr + b * ss_b + offs_t * ss_t, mask=fits)
        tl.store(sc_row + slot * ssc_c, s, mask=fits)
        for h in range(0, H):
            mk = fits[:, None] & mask_k[None, :]
            kt = tl.load(k_row + h * sk_h + offs_t[:, None] * sk_t + offs_k[None, :] * sk_k, mask=mk)
            tl.store(kc_row + h * skc_h + slot[:, None] * skc_c + offs_k[None, :] * skc_k, kt, mask=mk)
            mv = fits[:, None] & mask_v[None, :]
            vt = tl.load(v_row + h * sv_h + offs_t[:, None] * sv_t + offs_v[None, :] * sv_v, mask=mv)
            tl.store(vc_row + h * svc_h + slot[:, None] * svc_c + offs_v[None, :] * svc_v, vt, mask=mv)
        count += tl.sum(routed.to(tl.int32), axis=0)
    wanted = length + count

    # The tokens that found the cache full, one at a time, in order (rare: only when the row overflows).
    if EVICT:  # noqa: SIM102  (a constexpr branch: the drop kernel compiles without the eviction code)
        if valid & (wanted > C):
            tl.debug_barrier()
            seen = length * 0
            for t in range(0, T):
                routed_t = tl.load(routed_ptr + b * sr_b + t * sr_t) != 0
                seen += routed_t.to(tl.int64)
                if routed_t & (length + seen > C):
                    new = tl.load(score_ptr + b * ss_b + t * ss_t)
                    new_key = tl.floor(new.to(tl.float32) * GRID + 0.5)
                    best = tl.full((), float("inf"), tl.float32)
                    best_j = tl.zeros((), tl.int32)
                    has_nan = tl.zeros((), tl.int32)
                    for c0 in range(0, C, BLOCK_C):
                        offs_c = c0 + tl.arange(0, BLOCK_C)
                        s = tl.load(sc_row + offs_c * ssc_c, mask=offs_c < C, other=float("inf")).to(tl.float32)
                        s = tl.floor(s * GRID + 0.5)  # the keys
                        is_nan = s != s
                        has_nan = tl.maximum(has_nan, tl.max(is_nan.to(tl.int32), axis=0))
                        s = tl.where(is_nan, float("inf"), s)
                        low = tl.min(s, axis=0)
                        j = tl.min(tl.where(s == low, offs_c, C), axis=0)
                        better = low < best  # strictly: the first lowest slot wins
                        best_j = tl.where(better, j, best_j)
                        best = tl.where(better, low, best)
                    if (has_nan == 0) & (new_key > best):
                        tl.store(sc_row + best_j * ssc_c, new)
                        for h in range(0, H):
                            kt = tl.load(k_row + h * sk_h + t * sk_t + offs_k * sk_k, mask=mask_k)
                            tl.store(kc_row + h * skc_h + best_j * skc_c + offs_k * skc_k, kt, mask=mask_k)
                            vt = tl.load(v_row + h * sv_h + t * sv_t + offs_v * sv_v, mask=mask_v)
                            tl.store(vc_row + h * svc_h + best_j * svc_c + offs_v * svc_v, vt, mask=mask_v)
                    tl.debug_barrier()

    tl.debug_barrier()  # every thread has read the old length before one writes the new
    tl.store(new_length_ptr + b, tl.where(valid, tl.minimum(wanted, C), length))
    tl.store(overflow_ptr + b, tl.where(valid, tl.maximum(wanted - C, 0), INVALID))


def _check(k_cache, v_cache, score_cache, length, k, v, score, routed, policy, values: bool | None = None) -> None:
    _validate.op_inputs(CACHE_APPEND, (k_cache, v_cache, score_cache, length, k, v, score, routed),
                        {"policy": policy}, values=values)


def grid(dims, cdiv=triton.cdiv) -> tuple:
    """The launch grid, from the sizes of the op's shape letters (ints, or TensorRT's shape expressions)."""
    return (dims["B"],)


def blocks(t: int | None, c: int, block_t: int = BLOCK_T, block_c: int = BLOCK_C) -> dict[str, int]:
    """BLOCK_T and BLOCK_C for T new tokens (None: any T, as in a TensorRT engine) and capacity C."""
    return dict(BLOCK_T=block_t if t is None else min(block_t, triton.next_power_of_2(max(t, 1))),
                BLOCK_C=min(block_c, triton.next_power_of_2(max(c, 1))))


@triton.jit
def cache_append_trt(
    k_cache_ptr, v_cache_ptr, score_cache_ptr, length_ptr, k_ptr, v_ptr, score_ptr, routed_ptr,
    H, C, T, K, V,
    k_cache_out_ptr, v_cache_out_ptr, score_cache_out_ptr, length_out_ptr, overflow_ptr,
    EVICT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, INVALID: tl.constexpr,
):
    """The kernel in TensorRT's plugin ABI: the op's inputs, its sizes as int32 scalars, its outputs; contiguous
    tensors (strides from the sizes, in int64), routed as int32. The caches are aliased outputs: they are read
    (under evict) and written through the output pointers, which TensorRT binds to the input buffers; the length
    is read from its input and written to its own output."""
    h, c, t, k, v = H.to(tl.int64), C.to(tl.int64), T.to(tl.int64), K.to(tl.int64), V.to(tl.int64)
    _cache_append_kernel(
        k_cache_out_ptr, v_cache_out_ptr, score_cache_out_ptr, length_ptr, k_ptr, v_ptr, score_ptr, routed_ptr,
        length_out_ptr, overflow_ptr,
        H, C, T, K, V,
        h * c * k, c * k, k, 1,
        h * c * v, c * v, v, 1,
        c, 1,
        h * t * k, t * k, k, 1,
        h * t * v, t * v, v, 1,
        t, 1,
        t, 1,
        EVICT, BLOCK_T, BLOCK_C, BLOCK_K, BLOCK_V, INVALID,
    )


def _launch(k_cache, v_cache, score_cache, length, k, v, score, routed_u8, overflow, evict: bool,
            block_t: int = BLOCK_T, block_c: int = BLOCK_C) -> None:
    """Launch the kernel on checked inputs; ``routed_u8`` is [B, T] uint8 (0 or 1), any strides."""
    b, h, c, kd = k_cache.shape
    t, vd = k.shape[2], v_cache.shape[3]
    _cache_append_kernel[grid({"B": b})](
        k_cache, v_cache, score_cache, length, k, v, score, routed_u8, length, overflow,
        h, c, t, kd, vd,
        *k_cache.stride(), *v_cache.stride(), *score_cache.stride(),
        *k.stride(), *v.stride(), *score.stride(), *routed_u8.stride(),
        EVICT=evict, **blocks(t, c, block_t, block_c),
        BLOCK_K=triton.next_power_of_2(kd), BLOCK_V=triton.next_power_of_2(vd), INVALID=INVALID_LENGTH,
        num_warps=NUM_WARPS,
    )


def _append(k_cache, v_cache, score_cache, length, k, v, score, routed, policy, block_t: int = BLOCK_T,
            block_c: int = BLOCK_C, values: bool | None = None) -> torch.Tensor:
    """The in-place append; ``values=False`` skips the host check of the lengths (the kernel then refuses a bad
    row, as on a GPU)."""
    _check(k_cache, v_cache, score_cache, length, k, v, score, routed, policy, values)
    overflow = torch.empty_like(length)
    _launch(k_cache, v_cache, score_cache, length, k, v, score, routed.view(torch.uint8), overflow,
            policy == "evict", block_t, block_c)
    return overflow


def cache_append_(k_cache: torch.Tensor, v_cache: torch.Tensor, score_cache: torch.Tensor, length: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, routed: torch.Tensor, policy: str
                  ) -> torch.Tensor:
    """Store the routed tokens of a call in the cache, in place; see ``reference.cache_append``.

    Args:
        k_cache: [B, H, C, K]; v_cache: [B, H, C, V]; score_cache: [B, C]; length: [B] int64 valid entries
        (0 <= length <= C); these four are updated in place. k: [B, H, T, K], v: [B, H, T, V] the new tokens;
        score: [B, T]; routed: [B, T] bool; policy: ``drop`` or ``evict``. The float inputs share one dtype
        (float16, bfloat16 or float32); any strides; T >= 1 (1 in decode).

    Returns:
        overflow: [B] int64, the routed tokens of this call that found the cache full (-1 for a row the kernel
        refused for a length outside [0, C]). The cache, its scores and its length equal the reference's results
        exactly.

    Raises:
        InputError: (a ValueError) on inputs outside the op's preconditions: a wrong shape, dtype, device mix or
        policy, or a length outside [0, C] on the host.
    """
    return _append(k_cache, v_cache, score_cache, length, k, v, score, routed, policy)


def cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, score_cache: torch.Tensor, length: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, routed: torch.Tensor, policy: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The functional form, as ``reference.cache_append``: new k_cache, v_cache, score_cache, length, overflow.

    Copies the four cache tensors, then runs :func:`cache_append_` on the copies; the inputs are left unchanged.
    """
    _check(k_cache, v_cache, score_cache, length, k, v, score, routed, policy)
    k_cache, v_cache, score_cache, length = (x.clone() for x in (k_cache, v_cache, score_cache, length))
    overflow = cache_append_(k_cache, v_cache, score_cache, length, k, v, score, routed, policy)
    return k_cache, v_cache, score_cache, length, overflow
