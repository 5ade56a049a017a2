"""What every builder does: check the options every backend shares, tie the artifact to the model's weights, and
write the manifest."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import weights_sha256
from ..core.model import HAMLM
from ..errors import InputError
from ..ops.spec import POLICIES
from .manifest import Manifest, Program

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def check_options(capacity: int, policy: str, dtype: str = "fp32") -> None:
    """The options every builder takes: a capacity of at least 1, an overflow policy, an export dtype."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InputError(f"--max-cache must be at least 1, got {capacity}")
    if policy not in POLICIES:
        raise InputError(f"the overflow policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def manifest(backend: str, model: HAMLM, capacity: int, policy: str, dtype: str, programs: dict[str, Program],
             source: str | Path | None, **options: Any) -> Manifest:
    """The manifest of an artifact built from ``model`` (its config, thresholds and weights digest)."""
    return Manifest(backend=backend, dtype=dtype, capacity=capacity, policy=policy, model=model.cfg,
                    programs=programs, model_sha256=weights_sha256(model),
                    source=str(source) if source else None, options=options)


def cast_copy(model: HAMLM, dtype: torch.dtype) -> HAMLM:
    """A copy of the model in another dtype (the original is left as it is)."""
    return copy.deepcopy(model).to(dtype)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporters' chatter (absent torchvision ops, pytree deprecations, onnxscript's failed attempt to convert
    opset-27 nodes it has no adapter for, which :func:`ham_export.ops.onnx.finish` settles) says nothing about this
    export."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
