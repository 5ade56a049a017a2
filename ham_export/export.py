"""Builders: a HAM checkpoint into deployable artifacts, each a folder with its programs and a manifest.

- :func:`export_torch`: the ``torch.export`` programs, saved as ``prefill.pt2`` and ``decode.pt2``;
- :func:`export_onnx`: the same programs as ``prefill.onnx`` and ``decode.onnx``, with the HAM ops as ``ham.ai``
  nodes (``ops="custom"``, run with the ONNX Runtime op library) or in standard ONNX ops (``ops="standard"``,
  run by any ONNX runtime);
- :func:`export_native`: the same programs compiled by AOTInductor into one package ``model.pt2`` (models
  ``prefill`` and ``decode``), loadable from Python or from C++ (``AOTIModelPackageLoader``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from . import manifest as mf
from .checkpoint import weights_sha256
from .errors import InputError
from .model import HAMLM
from .programs import describe, export_programs

log = logging.getLogger(__name__)

OPS_FORMS = ("custom", "standard")
EXPORT_POLICIES = ("drop", "evict")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _validate(capacity: int, policy: str, dtype: str) -> None:
    if capacity < 1:
        raise InputError(f"--max-cache must be at least 1, got {capacity}")
    if policy not in EXPORT_POLICIES:
        raise InputError(f"the overflow policy must be one of {', '.join(EXPORT_POLICIES)}, got {policy!r}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _program_entries(model: HAMLM, capacity: int, dtype: str, suffix: str) -> dict[str, dict]:
    described = describe(model, capacity, dtype)
    return {name: {"file": f"{name}{suffix}",
                   "inputs": [t.to_dict() for t in io["inputs"]],
                   "outputs": [t.to_dict() for t in io["outputs"]]}
            for name, io in described.items()}


def _identity(model: HAMLM, source: str | Path | None) -> dict:
    return {"model_sha256": weights_sha256(model), "source": str(source) if source else None}


def export_torch(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop",
                 source: str | Path | None = None) -> Path:
    """Save the two ``torch.export`` programs and the manifest into ``out``; returns the folder."""
    _validate(capacity, policy, "fp32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    programs = export_programs(model, capacity, policy)
    for name, program in programs.items():
        torch.export.save(program, out / f"{name}.pt2")
    mf.write(out, mf.build("torch.export", model.cfg, capacity, policy, "fp32",
                           _program_entries(model, capacity, "fp32", ".pt2"),
                           {"ops": "torch.ops.ham (import ham_export.ops before torch.export.load)",
                            **_identity(model, source)}))
    log.info("wrote torch.export programs to %s", out)
    return out


def export_onnx(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", ops: str = "custom",
                dtype: str = "fp32", source: str | Path | None = None) -> Path:
    """Write ``prefill.onnx``, ``decode.onnx`` and the manifest into ``out``; returns the folder.

    ``ops="custom"`` keeps the HAM ops as ``ham.ai`` nodes (run with the op library of ``runtimes/onnxruntime``);
    ``ops="standard"`` lowers them to standard ONNX ops. Both pass ``onnx.checker`` with ``full_check``.
    """
    import onnx

    from .onnx_ops import register_schemas, translation_table
    from .programs import HEAD_OUTPUTS, state_names

    _validate(capacity, policy, dtype)
    if ops not in OPS_FORMS:
        raise InputError(f"--ops must be one of {', '.join(OPS_FORMS)}, got {ops!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    register_schemas()
    identity = _identity(model, source)
    cast = model if dtype == "fp32" else _cast_copy(model, DTYPES[dtype])
    programs = export_programs(cast, capacity, policy)
    n = model.cfg.n_layers
    names = {
        "prefill": (["tokens", "thresholds"], [*HEAD_OUTPUTS, *state_names(n, "present")]),
        "decode": (["token", "thresholds", *state_names(n, "past")], [*HEAD_OUTPUTS, *state_names(n, "present")]),
    }
    large = model.num_parameters() * DTYPES[dtype].itemsize > (1 << 30)
    for name, program in programs.items():
        path = out / f"{name}.onnx"
        inputs, outputs = names[name]
        with _quiet_exporter():
            onnx_program = torch.onnx.export(program, f=None, dynamo=True, input_names=inputs,
                                             output_names=outputs, custom_translation_table=translation_table(ops),
                                             verbose=False, optimize=True)
        onnx_program.save(str(path), external_data=large)
        onnx.checker.check_model(str(path), full_check=True)
    library = {"name": "libham_ort_ops.so", "domain": "ham.ai", "version": 1,
               "build": "bash scripts/build-ort-ops.sh"} if ops == "custom" else None
    mf.write(out, mf.build("onnxruntime", model.cfg, capacity, policy, dtype,
                           _program_entries(model, capacity, dtype, ".onnx"),
                           {"ops": ops, "op_library": library, **identity}))
    log.info("wrote ONNX programs (%s ops, %s) to %s", ops, dtype, out)
    return out


NATIVE_DEVICES = ("cpu", "cuda")


def export_native(model: HAMLM, out_file: str | Path, capacity: int, policy: str = "drop", device: str = "cpu",
                  source: str | Path | None = None) -> Path:
    """Compile the two programs with AOTInductor into one package (models ``prefill`` and ``decode``).

    The manifest ``ham_export.json`` goes beside the package. The compiled code calls the ``ham`` ops through the
    dispatcher: Python registers them with :mod:`ham_export.ops`; a C++ process loads the op library of
    ``runtimes/libtorch`` (``libham_torch_ops.so``). Returns the package's path.
    """
    from torch._inductor import aot_compile
    from torch._inductor.package import package_aoti

    from . import ops  # noqa: F401  (the programs call torch.ops.ham.*)

    _validate(capacity, policy, "fp32")
    out_file = Path(out_file)
    if out_file.suffix != ".pt2":
        raise InputError(f"the native package is a .pt2 file, got -o {out_file}")
    if device not in NATIVE_DEVICES:
        raise InputError(f"--device must be one of {', '.join(NATIVE_DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda needs a CUDA GPU on this machine (AOTInductor compiles for the GPU it "
                         "finds); none is visible to torch")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    identity = _identity(model, source)
    target = model if device == "cpu" else _cast_copy(model, torch.float32).to(device)
    programs = export_programs(target, capacity, policy)
    files = {}
    with _quiet_exporter():
        for name, program in programs.items():
            example_args, example_kwargs = program.example_inputs
            log.info("AOTInductor: compiling %s for %s", name, device)
            files[name] = aot_compile(program.module(), example_args, example_kwargs,
                                      options={"aot_inductor.package": True})
    package_aoti(str(out_file), files)
    entries = _program_entries(model, capacity, "fp32", ".pt2")
    for name, entry in entries.items():
        entry.update(file=out_file.name, model_name=name)
    library = {"name": "libham_torch_ops.so", "namespace": "ham", "build": "bash scripts/build-torch-ops.sh",
               "needed": "in C++ only; Python registers the ops with ham_export.ops"}
    mf.write(out_file.parent, mf.build("aotinductor", model.cfg, capacity, policy, "fp32", entries,
                                       {"device": device, "op_library": library, **identity}))
    log.info("wrote AOTInductor package %s", out_file)
    return out_file


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's chatter (absent torchvision ops, pytree deprecations) says nothing about this export."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def _cast_copy(model: HAMLM, dtype: torch.dtype) -> HAMLM:
    import copy

    return copy.deepcopy(model).to(dtype)
