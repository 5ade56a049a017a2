"""TensorRT engines from the rewritten ONNX programs: optimization profiles, the build, and the finishing step of a
folder that ``ham-export trt --prepare-only`` wrote.

- :func:`profiles` (no TensorRT): each program's optimization profile from the manifest's symbolic shapes (``B`` in
  [1, max batch], ``T`` in [1, max prompt], every other dimension fixed), and :func:`trtexec_shapes`, the same as
  ``trtexec`` flags;
- :func:`build_engine` (TensorRT): parse, build strongly typed with the aliased-plugin-I/O preview feature and one
  profile, save the plan, and read back what the engine says of itself (device memory, aliased outputs);
- :func:`finish`: build every engine of a prepared folder and write its manifest; ``python -m
  ham_export.plugins_trt.engine DIR`` runs it on a TensorRT machine.

Nothing here has run on TensorRT yet (see ``plugins_trt/README.md``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ham_export.errors import HamError

log = logging.getLogger(__name__)

DRAFT = "ham_export.draft.json"  # the manifest of a prepared folder, before its engines exist
QDP_MIN = (10, 9)  # ahead-of-time Quickly Deployable Plugins
QDP_BROKEN = (10, 14)  # QDPs are broken in 10.14.x (Torch-TensorRT turns them off there)


class EngineError(HamError):
    """An engine that cannot be built or loaded (TensorRT missing or too old, a parser or builder failure)."""


Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profiles(inputs: Sequence[Mapping[str, Any]], max_batch: int, max_prompt: int, opt_batch: int | None = None,
             opt_prompt: int | None = None) -> Shapes:
    """One program's profile: ``{input: (min, opt, max)}`` for every input with a symbolic dimension.

    ``inputs`` are the manifest's rows (``name``, ``shape`` with ``"B"``, ``"T"`` or ints); opt defaults to the
    max batch and a quarter of the max prompt."""
    sizes = {"B": (1, opt_batch or max_batch, max_batch),
             "T": (1, opt_prompt or max(1, max_prompt // 4), max_prompt)}
    out: Shapes = {}
    for row in inputs:
        shape = list(row["shape"])
        if all(isinstance(d, int) for d in shape):
            continue
        unknown = [d for d in shape if isinstance(d, str) and d not in sizes]
        if unknown:
            raise EngineError(f"input {row['name']}: no profile for dimension {unknown[0]!r}")
        out[row["name"]] = tuple(tuple(sizes[d][k] if isinstance(d, str) else d for d in shape) for k in range(3))
    return out


def profile_strings(shapes: Shapes) -> dict[str, list[str]]:
    """A profile as the manifest writes it: ``{input: ["1x4x256x32", opt, max]}``."""
    return {name: ["x".join(str(d) for d in dims) for dims in bounds] for name, bounds in shapes.items()}


def parse_profile(rows: Mapping[str, Sequence[str]]) -> Shapes:
    """The inverse of :func:`profile_strings`."""
    return {name: tuple(tuple(int(d) for d in text.split("x")) for text in bounds) for name, bounds in rows.items()}


def trtexec_shapes(shapes: Shapes) -> list[str]:
    """``--minShapes=...``, ``--optShapes=...``, ``--maxShapes=...`` for trtexec."""
    flags = []
    for k, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        flags.append(f"{flag}=" + ",".join(f"{name}:{'x'.join(str(d) for d in dims[k])}"
                                           for name, dims in shapes.items()))
    return flags


def tensorrt_version() -> str | None:
    """TensorRT's version here, or None when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def check_version(version: str, plugins: str) -> None:
    """Refuse a TensorRT the plugin mode cannot use: QDPs with ahead-of-time kernels need 10.9 or newer, and not
    10.14.x."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if plugins == "qdp" and ((major, minor) < QDP_MIN or (major, minor) == QDP_BROKEN):
        raise EngineError(f"TensorRT {version} cannot build the Quickly Deployable Plugins (ahead-of-time QDPs need "
                          f"10.9 or newer, and 10.14.x breaks them); use --plugins cpp")


def build_engine(onnx_path: Path, plan_path: Path, shapes: Shapes, plugins: str, library: Path | None = None,
                 workspace: int | None = None) -> dict[str, Any]:
    """Build one engine (strongly typed, one optimization profile, aliased plugin I/O) and save it; returns what the
    engine says of itself: device memory, file size, I/O names and each output's aliased input."""
    import tensorrt as trt

    check_version(trt.__version__, plugins)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugins == "qdp":
        from . import qdp  # noqa: F401  (registers the plugins)
    elif plugins == "cpp" and (library is None or builder.get_plugin_registry().load_library(str(library)) is None):
        raise EngineError(f"TensorRT cannot load the plugin library {library} (built against another TensorRT, or "
                          "already loaded)")
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:  # TensorRT 11 networks are always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError(f"TensorRT could not build {onnx_path} (see its log above)")
    plan_path.write_bytes(bytes(blob))
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    aliased = {}
    if hasattr(engine, "get_aliased_input_tensor"):  # 10.15+
        aliased = {n: engine.get_aliased_input_tensor(n) for n in outputs}
    return {"file": plan_path.name, "file_bytes": len(blob), "device_memory_bytes": int(engine.device_memory_size_v2),
            "aliased": {k: v for k, v in aliased.items() if v}}


def _device() -> tuple[str, int]:
    import torch

    if not torch.cuda.is_available():
        raise EngineError("building a TensorRT engine needs a CUDA GPU; none is visible")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), major * 10 + minor


def finish(directory: str | Path) -> Path:
    """Build the engines of a folder ``ham-export trt --prepare-only`` wrote (its ``ham_export.draft.json``), and
    write its manifest ``ham_export.json``; returns the folder."""
    from ham_export.ops.libraries import TRT

    directory = Path(directory)
    draft_path = directory / DRAFT
    if not draft_path.is_file():
        raise EngineError(f"{directory} holds no {DRAFT}; write one with ham-export trt --prepare-only")
    draft = json.loads(draft_path.read_text())
    version = tensorrt_version()
    if version is None:
        raise EngineError("TensorRT is not installed (pip install tensorrt --extra-index-url https://pypi.nvidia.com, "
                          "or NVIDIA's TensorRT package)")
    trt_info = dict(draft["tensorrt"])
    plugins = trt_info["plugins"]
    gpu, cc = _device()
    library = TRT.require() if plugins == "cpp" else None
    if plugins == "qdp":
        from . import qdp

        qdp.configure(cc=cc, ptx_version=trt_info.get("ptx_isa"))
    engines = {}
    for name, program in draft["programs"].items():
        onnx_file = directory / trt_info["onnx"][name]
        shapes = parse_profile(trt_info["profiles"][name])
        log.info("building the %s engine from %s", name, onnx_file)
        engines[name] = build_engine(onnx_file, directory / program["file"], shapes, plugins, library)
    trt_info.update(version=version, gpu=gpu, compute_capability=cc, engines=engines, state="built",
                    plugin_library=None if library is None else TRT.to_manifest(namespace="ham_cpp"))
    manifest = {**draft, "tensorrt": trt_info}
    (directory / "ham_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m ham_export.plugins_trt.engine DIR  (a folder from ham-export trt "
                         "--prepare-only)\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        finish(args[0])
    except HamError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    sys.stderr.write(f"built the engines of {args[0]}; check them with: ham-export check MODEL {args[0]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
