"""The HAM programs compiled with Apache TVM (Relax): import, lowerings of the HAM ops, compile, save.

:func:`import_program` imports a ``torch.export`` program into Relax with ``from_exported_program``; the three HAM
ops become hand-written TIR kernels (:func:`cache_attention_kernel`, :func:`cache_append_kernel`,
:func:`gdn_prefill_kernel`), called with ``call_tir`` or, for the cache append, ``call_tir_inplace``: the decode
step writes the new cache rows into the caller's cache buffers instead of copying the caches. Every kernel is
written twice over the same body, as a parallel CPU loop and as a flat CUDA grid, so that one module builds for
``llvm`` and for an NVIDIA target alike. :func:`export_tvm` compiles both programs with ``tvm.compile`` and saves
``prefill.so``, ``decode.so`` (self-contained: the weights are constants, the libraries need only the TVM
runtime) and the manifest.

Kernel semantics are those of :mod:`ham_export.reference`:

- cache attention: each query (b, h, t) attends to cache entries [0, length[b]) and to the routed new tokens
  s <= t, with one online-softmax pass (running max, running sum, rescaled accumulator); entries past the length
  are never read; a query that sees no key gives 0;
- cache append: per sequence, the routed tokens in order go to the next free slot; a routed token that finds the
  cache full counts as overflow and, under ``evict``, replaces the first lowest-score slot if its own score is
  strictly higher;
- GDN prefill: the gated delta rule token by token. Each column j of the state S [K, V] evolves on its own
  (vhat_j = alpha k^T S[:, j], S[:, j] <- alpha S[:, j] + beta k (v_j - vhat_j), o_j = q^T S[:, j] / sqrt(K)),
  so one thread runs one (b, h, j) over all tokens.
"""

# TVMScript: the kernels' macros use names bound where they expand (F821), and match_buffer binds buffers that
# only the macros use (F841).
# ruff: noqa: F821, F841

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from . import manifest as mf
from .errors import HamError, InputError
from .model import HAMLM

log = logging.getLogger(__name__)

LIBRARY_SUFFIX = ".so"
THREADS_PER_BLOCK = 64
NEG_INF = -1.0e30  # finite: exp(NEG_INF - x) is 0 without inf - inf
CPU_TARGETS = ("llvm",)
TARGET_ALIASES = {"cuda": "nvidia/nvidia-h100"}
SOURCES = ("exported", "onnx")


class TvmUnavailableError(HamError):
    """apache-tvm is not installed."""


def require_tvm():
    """The ``tvm`` module, or a clear error that says how to install it."""
    try:
        import tvm
    except ImportError as exc:
        raise TvmUnavailableError(f"the TVM backend needs apache-tvm ({exc}); install it with "
                                  f"`pip install 'ham-export[tvm]'` or `pip install apache-tvm`") from None
    return tvm


def resolve_target(name: str):
    """A ``tvm.target.Target`` from a name: ``llvm`` (CPU), ``cuda`` (an H100, sm_90), or any TVM target tag."""
    tvm = require_tvm()
    spec = TARGET_ALIASES.get(name, name)
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # TVM raises its own error classes for unknown tags and bad options
        raise InputError(f"unknown TVM target {name!r} ({str(exc).strip().splitlines()[-1]}); try llvm or cuda"
                         ) from None


def is_gpu(target) -> bool:
    return target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")


# -- the TIR kernels ---------------------------------------------------------------------------------------------

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
        for c in T.serial(T.int64(C)):
            if c < length[b]:
                visit(kc, vc, c)
        for s in range(t + 1):
            if routed[b, s]:
                visit(k, v, s)
        for e in T.serial(T.int64(V)):
            o[b, h, t, e] = T.if_then_else(run[1] > T.float32(0), acc[e] / run[1], T.float32(0))

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

    if policy not in ("drop", "evict"):
        raise InputError(f"policy must be drop or evict, got {policy!r}")
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
        count[0] = length[b]
        count[1] = T.int64(0)
        for t in T.serial(T.int64(N)):
            if routed[b, t]:
                if count[0] < C:
                    store(count[0])
                    count[0] = count[0] + T.int64(1)
                else:
                    count[1] = count[1] + T.int64(1)
                    if evict:
                        low[0] = T.int64(0)
                        for c in T.serial(T.int64(1), T.int64(C)):
                            if sc[b, c] < sc[b, low[0]]:
                                low[0] = c
                        if score[b, t] > sc[b, low[0]]:
                            store(low[0])
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


def import_program(program: torch.export.ExportedProgram, gpu: bool = False):
    """A ``torch.export`` program as a Relax IRModule (function ``main``, weights bound as constants)."""
    require_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(program, custom_convert_map=converters(gpu))


def _gpu_schedule_pass():
    """dlight's default GPU rules, function by function, falling back to a plain thread binding.

    On the prefill program dlight's rules fail on a few symbolic-shape functions (the conv's concatenation of the
    tail and the new rows, [B, T + W - 1, D], trips an iter-map divisibility check); those functions get
    ``DefaultGPUSchedule`` (one thread per output element) instead of failing the build.
    """
    import tvm
    from tvm.s_tir import dlight as dl

    rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())

    @tvm.transform.module_pass(opt_level=0, name="HamScheduleGpu")
    def schedule(mod, _ctx):
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled") == 1:
                continue
            single = tvm.IRModule({gvar: func})
            try:
                single = dl.ApplyDefaultSchedule(*rules)(single)
            except Exception as exc:  # dlight raises TVM's InternalError from deep inside a rule
                log.info("dlight cannot schedule %s (%s); binding threads plainly", gvar.name_hint,
                         str(exc).strip().splitlines()[0][:200])
                single[gvar] = _bind_threads(single[gvar])
            mod[gvar] = single[gvar]
        return mod

    return schedule


def _bind_threads(func):
    """A plain GPU schedule for a spatial PrimFunc: inline what can be inlined, then one thread per element of the
    innermost loop (when it is short and static) and one block per index of the other loops, fused."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[:-1]:
        with contextlib.suppress(Exception):  # a block that cannot be inlined keeps its own loop nest
            sch.compute_inline(block)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        extent = sch.get(loops[-1]).extent
        if len(loops) > 1 and isinstance(extent, tvm.tirx.IntImm) and extent.value <= 1024:
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.bind(outer, "blockIdx.x")
            sch.bind(loops[-1], "threadIdx.x")
        else:
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            outer, inner = sch.split(fused, [None, THREADS_PER_BLOCK])
            sch.bind(outer, "blockIdx.x")
            sch.bind(inner, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _gpu_pipeline(target):
    """The CUDA backend's default Relax pipeline with :func:`_gpu_schedule_pass` in place of dlight's pass."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                _gpu_schedule_pass()]

    @tvm.transform.module_pass(opt_level=0, name="HamGpuPipeline")
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(cuda.library_dispatch_passes(target) + legalize
                                            + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)

    return pipeline


def compile_program(program: torch.export.ExportedProgram, target):
    """Import and ``tvm.compile`` one program for ``target`` -> a ``VMExecutable``.

    The importer records torch.export's batch and prompt-length bounds (up to 4096 x 2^20) as
    ``tir_var_upper_bound``, which makes the memory planner reserve buffers for the largest call: they are removed,
    so that tensors of symbolic size are allocated per call at their actual size.
    """
    tvm = require_tvm()
    mod = import_program(program, gpu=is_gpu(target))
    mod["main"] = mod["main"].without_attr("tir_var_upper_bound")
    pipeline = _gpu_pipeline(target) if is_gpu(target) else "default"
    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def device_source(executable, kind: str = "cuda") -> str:
    """The generated device source (CUDA C for an NVIDIA target) held in a compiled executable; "" if none."""
    def find(module):
        if module.kind == kind:
            return module
        for child in module.imports:
            found = find(child)
            if found is not None:
                return found
        return None

    module = find(executable.mod)
    return module.inspect_source("") if module is not None else ""


def export_tvm(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", target: str = "llvm",
               source: str | Path | None = None, from_form: str = "exported") -> Path:
    """Compile the prefill and decode programs with TVM; write ``prefill.so``, ``decode.so`` and the manifest.

    ``from_form="exported"`` imports the ``torch.export`` programs. ``"onnx"`` is refused: the standard-op ONNX
    prefill graph holds Scan/Loop nodes that TVM's ONNX importer lacks, and the custom-op graph holds ham.ai nodes
    it cannot convert. For an NVIDIA target, ``<program>.cu`` beside each library holds the generated CUDA source.
    """
    from .export import _identity, _program_entries, _validate
    from .programs import export_programs

    if from_form not in SOURCES:
        raise InputError(f"--from must be one of {', '.join(SOURCES)}, got {from_form!r}")
    if from_form == "onnx":
        raise InputError("--from onnx is not supported: TVM's ONNX importer has no Scan/Loop (used by the "
                         "standard-op prefill graph) and no ham.ai ops; use --from exported")
    _validate(capacity, policy, "fp32")
    tvm = require_tvm()
    tvm_target = resolve_target(target)
    gpu = is_gpu(tvm_target)
    if not gpu and tvm_target.kind.name not in CPU_TARGETS:
        raise InputError(f"unsupported TVM target kind {tvm_target.kind.name!r}; use llvm or cuda")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = _identity(model, source)
    programs = export_programs(model, capacity, policy)
    for name, program in programs.items():
        executable = compile_program(program, tvm_target)
        executable.export_library(str(out / f"{name}{LIBRARY_SUFFIX}"))
        if gpu:
            (out / f"{name}.cu").write_text(device_source(executable))
        log.info("compiled the %s program for %s", name, tvm_target)
    device = "cuda" if gpu else "cpu"
    mf.write(out, mf.build("tvm", model.cfg, capacity, policy, "fp32",
                           _program_entries(model, capacity, "fp32", LIBRARY_SUFFIX),
                           {"ops": "TIR kernels (cache append in place)", "target": str(tvm_target),
                            "device": device, "entry": "main", "tvm_version": tvm.__version__,
                            "in_place": ["k_cache", "v_cache", "score_cache"], **identity}))
    log.info("wrote TVM programs (%s) to %s", tvm_target, out)
    return out


def load_programs(directory: Path, manifest: dict[str, Any]):
    """(device, {program: VirtualMachine}) for a TVM artifact; only the TVM runtime is needed."""
    tvm = require_tvm()
    from tvm import relax

    kind = manifest.get("device", "cpu")
    if kind == "cpu":
        device = tvm.cpu()
    elif kind == "cuda":
        device = tvm.cuda(0)
        if not device.exist:
            raise mf.ArtifactError(f"{directory} was compiled for CUDA ({manifest.get('target')}) but this machine "
                                   f"has no CUDA device; compile it again with --target llvm")
    else:
        raise mf.ArtifactError(f"{directory}: unknown TVM device {kind!r}")
    machines = {}
    for name in ("prefill", "decode"):
        path = directory / manifest["programs"][name]["file"]
        try:
            library = tvm.runtime.load_module(str(path))
        except Exception as exc:  # the loader raises TVM's own error classes for a bad or foreign library
            raise mf.ArtifactError(f"TVM cannot load {path}: {str(exc).strip().splitlines()[-1][:300]}") from None
        machines[name] = relax.VirtualMachine(library, device)
    return device, machines
