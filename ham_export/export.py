"""Builders: a HAM checkpoint into deployable artifacts, each a folder with its programs and a manifest.

- :func:`export_torch`: the ``torch.export`` programs, saved as ``prefill.pt2`` and ``decode.pt2``;
- :func:`export_onnx`: the same programs as ``prefill.onnx`` and ``decode.onnx``, with the HAM ops as ``ham.ai``
  nodes (``ops="custom"``, run with the ONNX Runtime op library) or in standard ONNX ops (``ops="standard"``,
  run by any ONNX runtime).
"""

from __future__ import annotations

import logging
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
