"""The TVM backend: the HAM programs compiled with Apache TVM (Relax): import, lower, compile, save, run.

:func:`import_program` imports a ``torch.export`` program into Relax with ``from_exported_program``; the three HAM
ops become the hand-written TIR kernels of :mod:`ham_export.ops.tir` (the cache append with ``call_tir_inplace``,
so that decode writes only the new cache rows into the caller's buffers). :func:`build` compiles both programs with
``tvm.compile`` and saves ``prefill.so``, ``decode.so`` (self-contained: the weights are constants, the libraries
need only the TVM runtime) and the manifest; for an NVIDIA target, ``<program>.cu`` beside each library holds the
generated CUDA source. :class:`TvmRunner` runs them in the Relax VM.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..core.model import HAMLM
from ..errors import HamError, InputError
from . import artifact, register
from .base import Backend, Option, Output, Runner
from .manifest import ArtifactError, Manifest
from .programs import HEAD_OUTPUTS, export_programs, program_table

log = logging.getLogger(__name__)

NAME = "tvm"
LIBRARY_SUFFIX = ".so"
THREADS_PER_BLOCK = 64
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



def import_program(program: torch.export.ExportedProgram, gpu: bool = False):
    """A ``torch.export`` program as a Relax IRModule (function ``main``, weights bound as constants)."""
    require_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    from ..ops.tir import converters

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


def build(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", source: str | Path | None = None,
          target: str = "llvm", from_form: str = "exported") -> Path:
    """Compile the prefill and decode programs with TVM; write ``prefill.so``, ``decode.so`` and the manifest.

    ``from_form="exported"`` imports the ``torch.export`` programs. ``"onnx"`` is refused: TVM's ONNX importer has
    no converter for the opset-27 form's LinearAttention and TensorScatter, nor for the opset-18 form's Scan/Loop,
    nor for the custom form's ham.ai nodes (docs/tvm.md).
    """
    if from_form not in SOURCES:
        raise InputError(f"--from must be one of {', '.join(SOURCES)}, got {from_form!r}")
    if from_form == "onnx":
        raise InputError("--from onnx is not supported: TVM's ONNX importer has no LinearAttention or TensorScatter "
                         "(--ops standard), no Scan/Loop (--ops portable) and no ham.ai ops; use --from exported")
    artifact.check_options(capacity, policy)
    tvm = require_tvm()
    tvm_target = resolve_target(target)
    gpu = is_gpu(tvm_target)
    if not gpu and tvm_target.kind.name not in CPU_TARGETS:
        raise InputError(f"unsupported TVM target kind {tvm_target.kind.name!r}; use llvm or cuda")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, program in export_programs(model, capacity, policy).items():
        executable = compile_program(program, tvm_target)
        files[name] = f"{name}{LIBRARY_SUFFIX}"
        executable.export_library(str(out / files[name]))
        if gpu:
            (out / f"{name}.cu").write_text(device_source(executable))
        log.info("compiled the %s program for %s", name, tvm_target)
    artifact.manifest(NAME, model, capacity, policy, "fp32", program_table(model, capacity, "fp32", files), source,
                      ops="TIR kernels (cache append in place)", target=str(tvm_target),
                      device="cuda" if gpu else "cpu", entry="main", tvm_version=tvm.__version__,
                      in_place=["k_cache", "v_cache", "score_cache"]).write(out)
    log.info("wrote TVM programs (%s) to %s", tvm_target, out)
    return out


class TvmRunner(Runner):
    """The TVM-compiled programs (``prefill.so``, ``decode.so``) in the Relax VM, on the CPU or a CUDA device.

    The state is a list of TVM tensors on the device. A decode step updates the caches of the state it is given in
    place (the TIR cache append writes only the new rows) and returns them in the new state, so a state must not be
    stepped twice; a state of torch tensors (from :meth:`state_tensors` or elsewhere) is copied to the device first
    and is never modified.
    """

    name = NAME

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.state_inputs = manifest.programs["decode"].inputs[2:]
        self.device = None
        self.machines: dict = {}

    def _load(self) -> None:
        tvm = require_tvm()
        from tvm import relax

        kind = self.manifest.options.get("device", "cpu")
        directory = self.manifest.directory
        if kind == "cpu":
            self.device = tvm.cpu()
        elif kind == "cuda":
            self.device = tvm.cuda(0)
            if not self.device.exist:
                raise ArtifactError(f"{directory} was compiled for CUDA ({self.manifest.options.get('target')}) but "
                                    f"this machine has no CUDA device; compile it again with --target llvm")
        else:
            raise ArtifactError(f"{directory}: unknown TVM device {kind!r}")
        for name in ("prefill", "decode"):
            path = self.manifest.path(name)
            try:
                library = tvm.runtime.load_module(str(path))
            except Exception as exc:  # the loader raises TVM's own error classes for a bad or foreign library
                raise ArtifactError(f"TVM cannot load {path}: {str(exc).strip().splitlines()[-1][:300]}") from None
            self.machines[name] = relax.VirtualMachine(library, self.device)["main"]
        self.probe_signature()  # the compiled libraries carry no signature to read
        log.info("tvm runner: target %s", self.manifest.options.get("target"))

    def _release(self) -> None:
        self.machines = {}

    def _tensor(self, value: torch.Tensor):
        import tvm

        return tvm.runtime.tensor(value.detach().contiguous().cpu().numpy(), self.device)

    def _call(self, fn, args) -> tuple[Output, list]:
        outputs = list(fn(*args))
        head = Output(*(torch.from_numpy(t.numpy()) for t in outputs[: len(HEAD_OUTPUTS)]))
        return head, outputs[len(HEAD_OUTPUTS):]

    def _prefill(self, tokens, thresholds):
        return self._call(self.machines["prefill"], [self._tensor(tokens), self._tensor(thresholds)])

    def _step(self, token, thresholds, state):
        state = list(state)
        if len(state) != len(self.state_inputs):
            raise InputError(f"a state has {len(self.state_inputs)} tensors (6 per layer), got {len(state)}")
        batch = token.shape[0]
        args = [self._tensor(token), self._tensor(thresholds)]
        for info, value in zip(self.state_inputs, state, strict=True):
            shape = [batch if d == "B" else d for d in info.shape]
            dtype = str(value.dtype).removeprefix("torch.")
            if list(value.shape) != shape or dtype != info.dtype:
                raise InputError(f"{info.name} must be {info.dtype} {shape}, got {dtype} {list(value.shape)}")
            args.append(self._tensor(value) if isinstance(value, torch.Tensor) else value)
        return self._call(self.machines["decode"], args)

    def state_tensors(self, state):
        return [t.detach().cpu() if isinstance(t, torch.Tensor) else torch.from_numpy(t.numpy()) for t in state]


def _requires() -> str | None:
    try:
        require_tvm()
    except TvmUnavailableError as exc:
        return str(exc)
    return None


BACKEND = register(Backend(
    name=NAME, command="tvm", summary="programs compiled with Apache TVM (prefill.so, decode.so)",
    build=build, runner=TvmRunner, requires=_requires,
    options=(
        Option("target", "--target", "llvm", "TVM target: llvm (this CPU), cuda (an NVIDIA H100, sm_90; compiles "
                                             "without a GPU) or a TVM target tag such as nvidia/nvidia-a100."),
        Option("from_form", "--from", "exported", "What to import: the torch.export programs (onnx is refused: TVM "
                                                  "cannot import any ONNX form's HAM ops).", SOURCES),
    ),
    manifest_keys={"ops": str, "target": str, "device": str, "entry": str, "tvm_version": str, "in_place": list},
    memory="TVM (Relax VM): not modelled; decode writes the new cache rows in place (call_tir_inplace), so a step "
           "holds the state plus its activations",
))
