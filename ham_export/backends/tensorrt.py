"""The TensorRT backend: ``prefill.plan`` and ``decode.plan``, TensorRT engines of the two programs with the HAM ops
as plugins (:mod:`ham_export.plugins_trt`).

The builder exports the custom-op ONNX (the ONNX Runtime backend's export), rewrites it for TensorRT's parser
(``prefill.trt.onnx``, ``decode.trt.onnx``), and builds one strongly typed engine per program with one optimization
profile (prefill: batch in [1, --max-batch], prompt in [1, --max-prompt]; decode: batch) and TensorRT's
aliased-plugin-I/O preview feature, so that the caches are updated in place. Plugin modes (``--plugins``):

- ``qdp``: Quickly Deployable Plugins whose kernels are the native path's Triton kernels compiled to PTX into the
  engine (TensorRT 10.9+, not 10.14.x): the engine runs under the plain C++ runtime, no plugin library;
- ``cpp``: the IPluginV3 library ``libham_trt_plugins.so`` (``bash scripts/build-trt-plugins.sh``), which every
  process that builds or loads the engine must load (``trtexec --dynamicPlugins``);
- ``none``: refused: the opset-27 ONNX form needs ``LinearAttention``, which TensorRT's parser does not document.

``--prepare-only`` writes everything that needs no TensorRT: the rewritten ONNX, the PTX of each plugin for
``--arch``, the manifest draft and ``build_engines.sh``, which finishes the folder on a TensorRT machine. Without
``--prepare-only`` and without TensorRT, the builder stops before any work with one line that says what to install.

The runner keeps the state on the GPU and binds each past cache and its present output to one buffer, so a decode
step writes only the new entries. Nothing here has run on TensorRT yet (see ``plugins_trt/README.md``).
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any

import torch

from ham_export.plugins_trt.engine import parse_profile, profile_strings

from ..core.model import HAMLM
from ..errors import InputError, MissingDependencyError
from ..ops.libraries import TRT
from . import artifact, register
from .base import Backend, Option, Runner, split_outputs
from .manifest import ArtifactError, Manifest
from .programs import HEAD_OUTPUTS, program_table, state_names

log = logging.getLogger(__name__)
NAME = "tensorrt"
PLUGIN_MODES = ("qdp", "cpp", "none")
ONNX_FILES = {"prefill": "prefill.trt.onnx", "decode": "decode.trt.onnx"}
ENGINE_FILES = {"prefill": "prefill.plan", "decode": "decode.plan"}
ALIASED_FIELDS = ("k_cache", "v_cache", "score_cache")  # the caches a decode step writes in place
BUILD_SCRIPT = "build_engines.sh"
NONE_REFUSED = ("--plugins none is not offered: the opset-27 ONNX form (ham-export onnx --ops standard) runs in ONNX "
                "Runtime, but TensorRT's parser documents no LinearAttention, which it needs for a prompt; use "
                "--plugins qdp or cpp")
INSTALL = ("TensorRT is not installed: pip install tensorrt --extra-index-url https://pypi.nvidia.com (10.9 or newer "
           "for --plugins qdp) on a machine with a CUDA GPU; or add --prepare-only to write the rewritten ONNX, the "
           "PTX and a build script to finish there")


def _parse_archs(arch: str) -> list[int]:
    try:
        archs = [int(a.strip().removeprefix("sm_")) for a in str(arch).split(",") if a.strip()]
    except ValueError:
        archs = []
    if not archs or any(a < 70 or a > 130 for a in archs):
        raise InputError(f"--arch must be compute capabilities such as 87,89,90, got {arch!r}")
    return archs


def _requires_build(plugins: str) -> str | None:
    from ham_export.plugins_trt.engine import tensorrt_version

    if tensorrt_version() is None:
        return INSTALL
    if not torch.cuda.is_available():
        return "building a TensorRT engine needs a CUDA GPU, and none is visible; add --prepare-only to build elsewhere"
    if plugins == "cpp":
        TRT.require()
    return None


def build(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", source: str | Path | None = None,
          dtype: str = "fp16", plugins: str = "qdp", max_batch: int = 8, max_prompt: int = 512,
          prepare_only: bool = False, arch: str = "90", ptx_isa: int | None = None) -> Path:
    """Write the rewritten ONNX, the manifest draft and the build script into ``out``; unless ``prepare_only``,
    build the engines and write the manifest. Returns the folder."""
    artifact.check_options(capacity, policy, dtype)
    if plugins not in PLUGIN_MODES:
        raise InputError(f"--plugins must be one of {', '.join(PLUGIN_MODES)}, got {plugins!r}")
    if plugins == "none":
        raise InputError(NONE_REFUSED)
    for flag, value in (("--max-batch", max_batch), ("--max-prompt", max_prompt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    archs = _parse_archs(arch)
    if not prepare_only:
        reason = _requires_build(plugins)
        if reason is not None:
            raise MissingDependencyError(reason)
    out = Path(out)
    prepare(model, out, capacity, policy, source, dtype, plugins, max_batch, max_prompt, archs, ptx_isa)
    if not prepare_only:
        from ham_export.plugins_trt.engine import finish

        finish(out)
    return out


def prepare(model: HAMLM, out: Path, capacity: int, policy: str, source: str | Path | None, dtype: str,
            plugins: str, max_batch: int, max_prompt: int, archs: list[int], ptx_isa: int | None) -> None:
    """Everything that needs no TensorRT (see the module doc)."""
    import onnx

    from ham_export.plugins_trt.engine import DRAFT, profiles
    from ham_export.plugins_trt.rewrite import to_tensorrt

    from .onnxruntime import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ham-trt-") as tmp:
        export_onnx(model, Path(tmp), capacity, policy, "custom", dtype)
        for name, file in ONNX_FILES.items():
            rewritten = to_tensorrt(onnx.load(str(Path(tmp) / f"{name}.onnx")), plugins)
            onnx.checker.check_model(rewritten, full_check=True)
            large = model.num_parameters() * artifact.DTYPES[dtype].itemsize > (1 << 30)
            onnx.save(rewritten, str(out / file), save_as_external_data=large)
    programs = program_table(model, capacity, dtype, ENGINE_FILES)
    shapes = {name: profiles([t.to_dict() for t in program.inputs], max_batch, max_prompt)
              for name, program in programs.items()}
    launches = write_ptx(out, programs, dtype, policy, archs, ptx_isa) if plugins == "qdp" else None
    info: dict[str, Any] = {
        "state": "prepared", "plugins": plugins, "onnx": dict(ONNX_FILES), "max_batch": max_batch,
        "max_prompt": max_prompt, "profiles": {n: profile_strings(s) for n, s in shapes.items()},
        "ptx_isa": ptx_isa, "ptx": launches, "aliased": {"decode": aliased_outputs(model.cfg.n_layers)},
    }
    draft = artifact.manifest(NAME, model, capacity, policy, dtype, programs, source, tensorrt=info).to_dict()
    (out / DRAFT).write_text(json.dumps(draft, indent=2) + "\n")
    write_build_script(out, plugins, shapes)
    log.info("prepared %s for TensorRT (%s plugins, %s)", out, plugins, dtype)


def aliased_outputs(n_layers: int) -> dict[str, str]:
    """Decode's outputs that must share their input's buffer: ``{present.i.k_cache: past.i.k_cache, ...}``."""
    return {present: past for past, present in zip(state_names(n_layers, "past"), state_names(n_layers, "present"),
                                                   strict=True)
            if present.rsplit(".", 1)[-1] in ALIASED_FIELDS}


def _sizes(programs) -> dict[str, int]:
    """The plugins' fixed sizes (H, C, K, V) from the manifest's state rows."""
    rows = {t.name: t.shape for t in programs["decode"].inputs}
    _, h, c, k = rows["past.0.k_cache"]
    v = rows["past.0.v_cache"][3]
    _, gh, gk, gv = rows["past.0.ssm"]
    return {"attention": dict(H=h, C=c, K=k, V=v), "gdn": dict(H=gh, K=gk, V=gv)}


class _Sym(str):
    """A shape expression written out, for the launch table (``B*H``, ``cdiv(T, 64)``)."""

    def __mul__(self, other: object) -> _Sym:
        return _Sym(f"{self}*{other}")


def write_ptx(out: Path, programs, dtype: str, policy: str, archs: list[int], ptx_isa: int | None) -> dict:
    """Each QDP's PTX for each architecture in ``out/ptx/``, and the launch table ``out/ptx/launches.json``."""
    from ham_export.plugins_trt.launch import compile_fitting
    from ham_export.plugins_trt.specs import PLUGINS

    float_type = {"fp32": "float32", "fp16": "float16"}[dtype]
    sizes = _sizes(programs)
    folder = out / "ptx"
    folder.mkdir(exist_ok=True)
    table: dict[str, list] = {}
    for op, plugin in PLUGINS.items():
        fixed = sizes["gdn"] if op == "GdnPrefill" else sizes["attention"]
        attributes = {"policy": policy} if plugin.op.attributes else None
        for cc in archs:
            lau, kernel = compile_fitting(op, float_type, fixed, attributes, cc, ptx_isa)
            file = f"{plugin.name}.{float_type}.sm_{cc}.ptx"
            (folder / file).write_text(kernel.ptx)
            symbols = {letter: _Sym(letter) for letter in "BHTCKV"}
            table.setdefault(plugin.name, []).append({
                "file": f"ptx/{file}", "kernel": kernel.name, "target": kernel.target, "ptx_isa": kernel.ptx_version,
                "grid": [str(g) for g in lau.grid(symbols, lambda a, b: _Sym(f"cdiv({a}, {b})"))],
                "block_x": kernel.block_x, "shared_bytes": kernel.shared, "scalars_int32": list(lau.sizes),
                "entry_params": len(kernel.param_types),
                "constexprs": {k: v for k, v in lau.constexprs.items() if isinstance(v, (int, float, str, bool))},
            })
    (folder / "launches.json").write_text(json.dumps(table, indent=2) + "\n")
    return {name: [row["file"] for row in rows] for name, rows in table.items()}


def write_build_script(out: Path, plugins: str, shapes: dict) -> None:
    """``build_engines.sh``: the engines from the prepared folder, on a machine with TensorRT and a GPU."""
    lines = [
        "#!/usr/bin/env bash",
        "# Build the TensorRT engines of this folder (written by ham-export trt --prepare-only) on a machine with",
        "# TensorRT and a CUDA GPU, then check them: ham-export check MODEL <this folder>.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    if plugins == "qdp":
        lines += ["# Quickly Deployable Plugins: needs ham-export[triton] and tensorrt >= 10.9 (not 10.14).",
                  "python -m ham_export.plugins_trt.engine ."]
    else:
        lines += [f"# The C++ plugin library: ${TRT.env}, or ham_export/lib/{TRT.file} ({TRT.build}).",
                  "python -m ham_export.plugins_trt.engine .",
                  "# Or with trtexec alone (no Python); then write ham_export.json from ham_export.draft.json by hand:"]
        for name, file in ONNX_FILES.items():
            command = ["trtexec", f"--onnx={file}", f'--dynamicPlugins="${{{TRT.env}}}"',
                       "--preview=+aliasedPluginIO1003", *_quoted(_trtexec_shapes(shapes[name])),
                       f"--saveEngine={ENGINE_FILES[name]}", "--skipInference"]
            lines.append("#   " + " ".join(command))
    path = out / BUILD_SCRIPT
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def _trtexec_shapes(shapes):
    from ham_export.plugins_trt.engine import trtexec_shapes

    return trtexec_shapes(shapes)


def _quoted(flags: list[str]) -> list[str]:
    return [shlex.quote(f) for f in flags]


def usage(path: Path) -> str:
    """What to run next with the folder: finish it (prepared), or the trtexec line and the C++ loading steps."""
    if not (path / "ham_export.json").is_file():
        return (f"prepared {path} for TensorRT; finish it on a machine with TensorRT and a GPU: "
                f"bash {path / BUILD_SCRIPT}")
    manifest = json.loads((path / "ham_export.json").read_text())
    info = manifest["tensorrt"]
    shapes = parse_profile(info["profiles"]["decode"])
    load = f" --dynamicPlugins={TRT.path()}" if info["plugins"] == "cpp" else ""
    opt = ",".join(f"{name}:{'x'.join(str(d) for d in dims[1])}" for name, dims in shapes.items())
    return "\n".join([
        f"time decode: trtexec --loadEngine={path / ENGINE_FILES['decode']}{load} --shapes={shlex.quote(opt)}",
        "  (random inputs: the kernels refuse the rows whose random cache length is outside [0, C]; "
        "--loadInputs gives real ones)",
        "in C++: nvinfer1::createInferRuntime(logger)"
        + (f"; runtime->getPluginRegistry().loadLibrary(\"{TRT.file}\")" if info["plugins"] == "cpp" else "")
        + "; runtime->deserializeCudaEngine(plan); engine->createExecutionContext(); setInputShape and "
          "setTensorAddress for every I/O (each past cache and its present output on one buffer); enqueueV3 "
          "(examples/cpp/trt_greedy.cc)",
    ])


def plugin_library(manifest: Manifest) -> Path | None:
    """The plugin library a process must load to run this artifact's engines (None for the QDP form)."""
    return TRT.path() if (manifest.options.get("tensorrt") or {}).get("plugins") == "cpp" else None


# ------------------------------------------------------------------------------------------------ the runner

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
_LOADED_LIBRARIES: set[str] = set()  # a plugin library is loaded once per process (loadLibrary refuses twice)


class TrtRunner(Runner):
    """The engines on the GPU; the state stays there, each past cache bound to its present output in decode."""

    name = NAME

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.info = manifest.options.get("tensorrt") or {}
        self.engines: dict = {}
        self.contexts: dict = {}
        self.past = state_names(self.n_layers, "past")
        self.present = state_names(self.n_layers, "present")
        self.aliased = aliased_outputs(self.n_layers)

    def _load(self) -> None:
        import tensorrt as trt

        if not torch.cuda.is_available():
            raise ArtifactError("a TensorRT artifact runs on a CUDA GPU, and none is visible")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.info.get("plugins") == "cpp":
            library = str(TRT.require())
            if library not in _LOADED_LIBRARIES:
                if self.runtime.get_plugin_registry().load_library(library) is None:
                    raise ArtifactError(f"TensorRT cannot load the plugin library {library}")
                _LOADED_LIBRARIES.add(library)
        for name in ENGINE_FILES:
            path = self.manifest.path(name)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT {trt.__version__} cannot load {path} (built with TensorRT "
                                    f"{self.info.get('version')} on {self.info.get('gpu')}); build it again here")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()

    def _release(self) -> None:
        self.contexts, self.engines = {}, {}

    def _run(self, name: str, feeds: dict[str, torch.Tensor], bound: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        import tensorrt as trt

        engine, context = self.engines[name], self.contexts[name]
        keep = []
        for tensor_name, value in feeds.items():
            value = value.to("cuda").contiguous()
            keep.append(value)
            context.set_input_shape(tensor_name, tuple(value.shape))
            context.set_tensor_address(tensor_name, value.data_ptr())
        outputs = {}
        for i in range(engine.num_io_tensors):
            tensor_name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor_name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(context.get_tensor_shape(tensor_name))
            if tensor_name in bound:
                value = bound[tensor_name]
                if tuple(value.shape) != shape:
                    raise InputError(f"{tensor_name} has shape {tuple(value.shape)}, the engine expects {shape}")
            else:
                dtype = _TORCH_DTYPES[engine.get_tensor_dtype(tensor_name).name]
                value = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(tensor_name, value.data_ptr())
            outputs[tensor_name] = value
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(f"TensorRT failed to run the {name} engine (see its log)")
        stream.synchronize()
        return outputs

    def _prefill(self, tokens, thresholds):
        outputs = self._run("prefill", {"tokens": tokens, "thresholds": thresholds}, {})
        return split_outputs([outputs[n] for n in (*HEAD_OUTPUTS, *self.present)])

    def _step(self, token, thresholds, state):
        state = [x if x.is_cuda else x.to("cuda") for x in state]
        if len(state) != len(self.past):
            raise InputError(f"a state has {len(self.past)} tensors (6 per layer), got {len(state)}")
        past = dict(zip(self.past, state, strict=True))
        bound = {present: past[name] for present, name in self.aliased.items()}
        outputs = self._run("decode", {"token": token, "thresholds": thresholds, **past}, bound)
        return split_outputs([outputs[n] for n in (*HEAD_OUTPUTS, *self.present)])

    def state_tensors(self, state):
        return [x.detach().cpu().clone() for x in state]


def _requires() -> str | None:
    from ham_export.plugins_trt.engine import tensorrt_version

    if tensorrt_version() is None:
        return INSTALL.split(";")[0]
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


BACKEND = register(Backend(
    name=NAME, command="trt",
    summary="TensorRT engines with the HAM ops as plugins (prefill.plan, decode.plan), caches in place (CUDA)",
    build=build, runner=TrtRunner, requires=_requires,
    options=(
        Option("dtype", "--dtype", "fp16", "The dtype of the weights, activations and state (the engines are "
                                           "strongly typed).", ("fp32", "fp16")),
        Option("plugins", "--plugins", "qdp", "qdp: Quickly Deployable Plugins, Triton kernels as PTX inside the "
                                              "engine (TensorRT 10.9+); cpp: the IPluginV3 library "
                                              "libham_trt_plugins.so; none: standard ops only (refused: TensorRT's "
                                              "parser documents no LinearAttention).",
               PLUGIN_MODES),
        Option("max_batch", "--max-batch", 8, "The largest batch of the engines' profiles.", type=int),
        Option("max_prompt", "--max-prompt", 512, "The longest prompt of the prefill engine's profile.", type=int),
        Option("arch", "--arch", "90", "The compute capabilities of the PTX --prepare-only writes, comma-separated "
                                       "(87 Jetson Orin, 89 Ada, 90 Hopper); a build compiles for its own GPU."),
        Option("ptx_isa", "--ptx-isa", None, "The PTX ISA version of the QDP kernels, e.g. 85 for 8.5 (default: "
                                             "Triton's newest); pin it to one the target's driver accepts.",
               type=int),
        Option("prepare_only", "--prepare-only", False, "Write what needs no TensorRT (rewritten ONNX, PTX, "
                                                        "manifest draft, build_engines.sh) and stop.", type=bool),
    ),
    manifest_keys={"tensorrt": dict},
    memory="TensorRT: each engine's device memory (activations and scratch; the manifest's tensorrt.engines) + "
           "the state and head buffers the application binds + the weights inside the engines",
    usage=usage,
))
