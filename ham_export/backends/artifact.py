"""What every builder does: check the options every backend shares, tie the artifact to the model's weights, and
write the manifest; and how the CLI puts an artifact in place: whole or not at all (:func:`written_atomically`)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import tempfile
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


@contextlib.contextmanager
def written_atomically(out: str | Path, is_file: bool = False) -> Iterator[Path]:
    """Build an artifact where no reader sees it, then put it in place whole: yields the path to build at.

    A folder artifact is built in a hidden sibling folder, then exchanged with ``out`` in one ``renameat2``
    (``RENAME_EXCHANGE``; two renames where the file system lacks it) and the old one removed, so that ``out`` holds
    the old artifact or the new one, never a mix, whenever the process stops. A file artifact (a ``.pt2`` package
    and the manifest beside it) is built in a hidden sibling folder and moved in, the package first: a stop between
    the two moves leaves the new package beside the old manifest, whose weights digest no longer matches.

    A lock file beside ``out`` (``.<name>.lock``) refuses a second export into it while one runs; SIGTERM is
    turned into KeyboardInterrupt while the build runs, so that a kill by ``timeout`` or a scheduler cleans up as
    Ctrl-C does. An existing non-empty ``out`` that is not a ham-export artifact is refused, never replaced.
    """
    from .manifest import MANIFEST

    out = Path(out).absolute()
    home = out.parent
    home.mkdir(parents=True, exist_ok=True)
    if not is_file and out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(f"{out} exists and is not a ham-export artifact (no {MANIFEST}); choose another -o")
    with open(home / f".{out.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another ham-export is writing {out} (it holds {lock.name}); wait for it") from None
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=home))
        previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            yield stage / out.name if is_file else stage
            if is_file:
                os.replace(stage / out.name, out)
                os.replace(stage / MANIFEST, home / MANIFEST)
            else:
                _replace_folder(stage, out)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(stage, ignore_errors=True)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _replace_folder(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``; the old ``out``, if any, ends at ``new`` (removed by the caller)."""
    if not out.exists():
        new.rename(out)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    at_cwd, rename_exchange = -100, 2
    if exchange is not None and exchange(at_cwd, os.fsencode(new), at_cwd, os.fsencode(out), rename_exchange) == 0:
        return
    old = new.with_name(new.name + ".old")  # no atomic exchange here: two renames
    out.rename(old)
    new.rename(out)
    old.rename(new)
