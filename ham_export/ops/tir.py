"""The HAM ops in Apache TVM: hand-written TIR kernels and the Relax importer's converters that call them.

:func:`converters` is the ``custom_convert_map`` of ``from_exported_program``: the three HAM ops of a
``torch.export`` program become calls of :func:`cache_attention_kernel`, :func:`cache_append_kernel` and
:func:`gdn_prefill_kernel` (``call_tir``, or for the cache append ``call_tir_inplace``: the decode step writes the new
cache rows into the caller's cache buffers instead of copying the caches). Every kernel is written twice over the same
body, as a parallel CPU loop and as a flat CUDA grid, so that one module builds for ``llvm`` and for an NVIDIA target
alike.

Kernel semantics are those of :mod:`ham_export.ops.reference`:

- cache attention: each query (b, h, t) attends to cache entries [0, length[b]) and to the routed new tokens
  s <= t, with one online-softmax pass (running max, running sum, rescaled accumulator); entries past the length
  are never read; a query that sees no key gives 0;
- cache append: per sequence, the routed tokens in order go to the next free slot; a routed token that finds the
  cache full counts as overflow and, under ``evict``, replaces the first slot of lowest score key (the score rounded
  to the grid of ``spec.EVICT_GRID``) if its own key is strictly higher;
- GDN prefill: the gated delta rule token by token. Each column j of the state S [K, V] evolves on its own
  (vhat_j = alpha k^T S[:, j], S[:, j] <- alpha S[:, j] + beta k (v_j - vhat_j), o_j = q^T S[:, j] / sqrt(K)),
  so one thread runs one (b, h, j) over all tokens.

The lengths live in device buffers the kernels cannot raise from, so a row whose ``length`` lies outside [0, C] is
refused in the kernel, as the op spec says for device kernels (:mod:`ham_export.ops.spec`): the attention reads none
of its cache and writes NaN; the append writes nothing, keeps its length and reports overflow -1.
"""

# TVMScript: the kernels' macros use names bound where they expand (F821), and match_buffer binds buffers that
# only the macros use (F841).
# ruff: noqa: F821, F841

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .spec import EVICT_GRID, INVALID_LENGTH, POLICIES

THREADS_PER_BLOCK = 64
NEG_INF = -1.0e30  # finite: exp(NEG_INF - x) is 0 without inf - inf
NAN = float("nan")  # the output of a refused row


def cache_attention_kernel(heads: int, capacity: int, dk: int, dv: int, gpu: bool):
    """TIR for ``ham.cache_attention``: (q, k_cache, v_cache, length, k, v, routed, scale) -> o [B, H, T, V]."""
    from tvm.script import tirx as T

    H, C, K, V = heads, capacity, dk, dv  # the shape letters of reference.py
    f32 = "float32"
    threads = THREADS_PER_BLOCK

    # Non-hygienic macros: their names (q, b, h, t, ...) resolve where they are expanded, in the kernel below.
    @T.macro(hygienic=False)
    def visit(kbuf, vbuf, pos):
        # one key: fold it into the running max run[0], the running sum run[1] and the accumulator
        dot[0] = T.float32(0)
        for d in T.serial(T.int64(K)):
            dot[0] = dot[0] + q[b, h, t, d] * kbuf[b, h, pos, d]
        dot[0] = dot[0] * scale[h]
        top = T.max(run[0], dot[0])
        fade = T.exp(run[0] - top)
        weight = T.exp(dot[0] - top)
        run[1] = run[1] * fade + weight
        for e in T.serial(T.int64(V)):
            acc[e] = acc[e] * fade + weight * vbuf[b, h, pos, e]
        run[0] = top

    @T.macro(hygienic=False)
    def body(i, visit):
        acc = T.alloc_buffer((V,), f32, scope="local")
        run = T.alloc_buffer((2,), f32, scope="local")
        dot = T.alloc_buffer((1,), f32, scope="local")
        b = i // (H * N)
        h = i // N % H
        t = i % N
        run[0] = T.float32(NEG_INF)
        run[1] = T.float32(0)
        for e in T.serial(T.int64(V)):
            acc[e] = T.float32(0)
        if length[b] >= 0 and length[b] <= C:
            for c in T.serial(T.int64(C)):
                if c < length[b]:
                    visit(kc, vc, c)
            for s in range(t + 1):
                if routed[b, s]:
                    visit(k, v, s)
            for e in T.serial(T.int64(V)):
                o[b, h, t, e] = T.if_then_else(run[1] > T.float32(0), acc[e] / run[1], T.float32(0))
        else:  # refused: a length outside [0, C]
            for e in T.serial(T.int64(V)):
                o[b, h, t, e] = T.float32(NAN)

    @T.prim_func(private=True)
    def cache_attention(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, len_h: T.handle, k_h: T.handle,
                        v_h: T.handle, routed_h: T.handle, scale_h: T.handle, o_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        N = T.int64()
        q = T.match_buffer(q_h, (B, H, N, K), f32)
        kc = T.match_buffer(kc_h, (B, H, C, K), f32)
        vc = T.match_buffer(vc_h, (B, H, C, V), f32)
        length = T.match_buffer(len_h, (B,), "int64")
        k = T.match_buffer(k_h, (B, H, N, K), f32)
        v = T.match_buffer(v_h, (B, H, N, V), f32)
        routed = T.match_buffer(routed_h, (B, N), "bool")
        scale = T.match_buffer(scale_h, (H,), f32)
        o = T.match_buffer(o_h, (B, H, N, V), f32)
        if gpu:
            for bx in T.thread_binding((B * H * N + threads - 1) // threads, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(threads), thread="threadIdx.x"):
                    if bx * threads + tx < B * H * N:
                        body(bx * threads + tx, visit)
        else:
            for i in T.parallel(B * H * N):
                body(i, visit)

    return cache_attention


def cache_append_kernel(heads: int, capacity: int, dk: int, dv: int, policy: str, gpu: bool):
    """TIR for ``ham.cache_append``, in place: the caches (args 0-2) are written, length and overflow are new.

    Arguments: (k_cache, v_cache, score_cache, length, k, v, score, routed, length_out, overflow).
    """
    from tvm.script import tirx as T

    if policy not in POLICIES:
        raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    evict = policy == "evict"
    H, C, K, V = heads, capacity, dk, dv
    f32 = "float32"
    threads = THREADS_PER_BLOCK

    @T.macro(hygienic=False)
    def store(slot):
        for hh, d in T.grid(T.int64(H), T.int64(K)):
            kc[b, hh, slot, d] = k[b, hh, t, d]
        for hh, e in T.grid(T.int64(H), T.int64(V)):
            vc[b, hh, slot, e] = v[b, hh, t, e]
        sc[b, slot] = score[b, t]

    @T.macro(hygienic=False)
    def body(b, evict, store):
        count = T.alloc_buffer((2,), "int64", scope="local")  # [used slots, overflow]
        low = T.alloc_buffer((1,), "int64", scope="local")
        low_key = T.alloc_buffer((1,), "float32", scope="local")
        count[0] = length[b]
        count[1] = T.int64(0)
        if length[b] >= 0 and length[b] <= C:
            for t in T.serial(T.int64(N)):
                if routed[b, t]:
                    if count[0] < C:
                        store(count[0])
                        count[0] = count[0] + T.int64(1)
                    else:
                        count[1] = count[1] + T.int64(1)
                        if evict:
                            # the slot of lowest key (the score rounded to the grid, spec.EVICT_GRID)
                            low[0] = T.int64(0)
                            low_key[0] = T.floor(sc[b, 0] * T.float32(EVICT_GRID) + T.float32(0.5))
                            for c in T.serial(T.int64(1), T.int64(C)):
                                if T.floor(sc[b, c] * T.float32(EVICT_GRID) + T.float32(0.5)) < low_key[0]:
                                    low[0] = c
                                    low_key[0] = T.floor(sc[b, c] * T.float32(EVICT_GRID) + T.float32(0.5))
                            if T.floor(score[b, t] * T.float32(EVICT_GRID) + T.float32(0.5)) > low_key[0]:
                                store(low[0])
        else:  # refused: a length outside [0, C]; nothing is written
            count[1] = T.int64(INVALID_LENGTH)
        length_out[b] = count[0]
        overflow[b] = count[1]

    @T.prim_func(private=True)
    def cache_append(kc_h: T.handle, vc_h: T.handle, sc_h: T.handle, len_h: T.handle, k_h: T.handle,
                     v_h: T.handle, score_h: T.handle, routed_h: T.handle, len_out_h: T.handle, ovf_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        N = T.int64()
        kc = T.match_buffer(kc_h, (B, H, C, K), f32)
        vc = T.match_buffer(vc_h, (B, H, C, V), f32)
        sc = T.match_buffer(sc_h, (B, C), f32)
        length = T.match_buffer(len_h, (B,), "int64")
        k = T.match_buffer(k_h, (B, H, N, K), f32)
        v = T.match_buffer(v_h, (B, H, N, V), f32)
        score = T.match_buffer(score_h, (B, N), f32)
        routed = T.match_buffer(routed_h, (B, N), "bool")
        length_out = T.match_buffer(len_out_h, (B,), "int64")
        overflow = T.match_buffer(ovf_h, (B,), "int64")
        if gpu:
            for bx in T.thread_binding((B + threads - 1) // threads, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(threads), thread="threadIdx.x"):
                    if bx * threads + tx < B:
                        body(bx * threads + tx, evict, store)
        else:
            for i in T.parallel(B):
                body(i, evict, store)

    return cache_append


def gdn_prefill_kernel(heads: int, dk: int, dv: int, gpu: bool):
    """TIR for ``ham.gdn_prefill``: (q, k, v, g, beta, state) -> (o, vhat, state_out), token by token."""
    from tvm.script import tirx as T

    H, K, V = heads, dk, dv
    f32 = "float32"
    threads = THREADS_PER_BLOCK

    @T.macro(hygienic=False)
    def body(i):
        col = T.alloc_buffer((K,), f32, scope="local")
        acc = T.alloc_buffer((2,), f32, scope="local")
        b = i // (H * V)
        h = i // V % H
        j = i % V
        for d in T.serial(T.int64(K)):
            col[d] = state[b, h, d, j]
        for t in T.serial(T.int64(N)):
            alpha = T.exp(g[b, t, h])
            acc[0] = T.float32(0)
            for d in T.serial(T.int64(K)):
                acc[0] = acc[0] + k[b, t, h, d] * col[d]
            acc[0] = alpha * acc[0]
            vhat[b, t, h, j] = acc[0]
            acc[0] = beta[b, t, h] * (v[b, t, h, j] - acc[0])
            acc[1] = T.float32(0)
            for d in T.serial(T.int64(K)):
                col[d] = alpha * col[d] + k[b, t, h, d] * acc[0]
                acc[1] = acc[1] + q[b, t, h, d] * col[d]
            o[b, t, h, j] = acc[1] / T.sqrt(T.float32(K))
        for d in T.serial(T.int64(K)):
            out[b, h, d, j] = col[d]

    @T.prim_func(private=True)
    def gdn_prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, g_h: T.handle, beta_h: T.handle,
                    state_h: T.handle, o_h: T.handle, vhat_h: T.handle, out_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        N = T.int64()
        q = T.match_buffer(q_h, (B, N, H, K), f32)
        k = T.match_buffer(k_h, (B, N, H, K), f32)
        v = T.match_buffer(v_h, (B, N, H, V), f32)
        g = T.match_buffer(g_h, (B, N, H), f32)
        beta = T.match_buffer(beta_h, (B, N, H), f32)
        state = T.match_buffer(state_h, (B, H, K, V), f32)
        o = T.match_buffer(o_h, (B, N, H, V), f32)
        vhat = T.match_buffer(vhat_h, (B, N, H, V), f32)
        out = T.match_buffer(out_h, (B, H, K, V), f32)
        if gpu:
            for bx in T.thread_binding((B * H * V + threads - 1) // threads, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(threads), thread="threadIdx.x"):
                    if bx * threads + tx < B * H * V:
                        body(bx * threads + tx)
        else:
            for i in T.parallel(B * H * V):
                body(i)

    return gdn_prefill


# -- the importer's converters -------------------------------------------------------------------------------------

def _shape(importer, value) -> list:
    return list(importer.shape_of(value))


def converters(gpu: bool) -> dict[str, Any]:
    """``custom_convert_map`` for ``from_exported_program``: the HAM ops as TIR calls, plus ``aten.amin``."""
    from tvm import relax

    def tensor(shape, dtype):
        return relax.TensorType(shape, dtype)

    def attention(node, importer):
        q, kc, vc, length, k, v, routed, scale = (importer.env[a] for a in node.args[:8])
        b, h, t, dk = _shape(importer, q)
        capacity, dv = _shape(importer, kc)[2], _shape(importer, vc)[3]
        kernel = cache_attention_kernel(int(h), int(capacity), int(dk), int(dv), gpu)
        bb = importer.block_builder
        gv = bb.add_func(kernel, "ham_cache_attention")
        return bb.emit(relax.call_tir(gv, [q, kc, vc, length, k, v, routed, scale],
                                      tensor([b, h, t, dv], "float32")))

    def append(node, importer):
        kc, vc, sc, length, k, v, score, routed = (importer.env[a] for a in node.args[:8])
        policy = node.args[8] if len(node.args) > 8 else node.kwargs["policy"]
        b, h, capacity, dk = _shape(importer, kc)
        dv = _shape(importer, vc)[3]
        kernel = cache_append_kernel(int(h), int(capacity), int(dk), int(dv), policy, gpu)
        bb = importer.block_builder
        gv = bb.add_func(kernel, f"ham_cache_append_{policy}")
        outs = [kc.ty, vc.ty, sc.ty, tensor([b], "int64"), tensor([b], "int64")]
        return bb.emit(relax.call_tir_inplace(gv, [kc, vc, sc, length, k, v, score, routed], [0, 1, 2, -1, -1],
                                              outs))

    def gdn(node, importer):
        q, k, v, g, beta, state = (importer.env[a] for a in node.args[:6])
        b, t, h, dk = _shape(importer, q)
        dv = _shape(importer, v)[3]
        kernel = gdn_prefill_kernel(int(h), int(dk), int(dv), gpu)
        bb = importer.block_builder
        gv = bb.add_func(kernel, "ham_gdn_prefill")
        outs = [tensor([b, t, h, dv], "float32"), tensor([b, t, h, dv], "float32"), state.ty]
        return bb.emit(relax.call_tir(gv, [q, k, v, g, beta, state], outs))

    def amin(node, importer):
        x = importer.env[node.args[0]]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return importer.block_builder.emit(relax.op.min(x, axis=dims, keepdims=keepdim))

    return {"cache_attention.default": attention, "cache_append.default": append, "gdn_prefill.default": gdn,
            "amin.default": amin}
