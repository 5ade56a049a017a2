"""The ONNX Runtime custom-op library of the HAM ops (``runtimes/onnxruntime``, domain ``ham.ai``).

Build it with ``bash scripts/build-ort-ops.sh``; it lands at ``build/ort/libham_ort_ops.so`` unless the
``HAM_ORT_OPS_LIB`` environment variable names another file. :func:`session_options` registers it with ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HamError

if TYPE_CHECKING:
    import onnxruntime

ENV_VAR = "HAM_ORT_OPS_LIB"
BUILD_COMMAND = "bash scripts/build-ort-ops.sh"
_REPO = Path(__file__).resolve().parent.parent


class OrtOpsLibraryError(HamError):
    """The op library is missing or ONNX Runtime cannot load it."""


def library_path() -> Path:
    """Where the op library is: ``$HAM_ORT_OPS_LIB`` when set, else ``<repo>/build/ort/libham_ort_ops.so``."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser().resolve()
    return _REPO / "build" / "ort" / "libham_ort_ops.so"


def _existing_library(path: str | Path | None) -> Path:
    lib = Path(path).expanduser().resolve() if path is not None else library_path()
    if not lib.is_file():
        origin = f" (from ${ENV_VAR})" if path is None and os.environ.get(ENV_VAR) else ""
        raise OrtOpsLibraryError(f"ONNX Runtime op library not found at {lib}{origin}; build it with {BUILD_COMMAND}")
    return lib


def session_options(options: onnxruntime.SessionOptions | None = None, *,
                    library: str | Path | None = None) -> onnxruntime.SessionOptions:
    """Session options with the ham.ai op library registered.

    Args:
        options: options to register the library with (a new ``SessionOptions`` when None); returned.
        library: the library file; :func:`library_path` when None.

    Raises:
        OrtOpsLibraryError: the file is missing, or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    lib = _existing_library(library)
    options = options if options is not None else ort.SessionOptions()
    try:
        options.register_custom_ops_library(str(lib))
    except ort.capi.onnxruntime_pybind11_state.Fail as e:
        raise OrtOpsLibraryError(f"ONNX Runtime cannot load the op library {lib}: {e}; rebuild it with "
                                 f"{BUILD_COMMAND}") from e
    return options


def _diagnostics(library: str | Path | None) -> ctypes.CDLL:
    # The same file ONNX Runtime loaded: dlopen hands back that copy, so the counters are the ones the kernels bump.
    lib = ctypes.CDLL(str(_existing_library(library)))
    lib.HamOrtOpsCopyStats.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
    lib.HamOrtOpsCopyStats.restype = None
    lib.HamOrtOpsResetCopyStats.argtypes = []
    lib.HamOrtOpsResetCopyStats.restype = None
    return lib


def has_cuda_kernels(library: str | Path | None = None) -> bool:
    """Whether the library was built with its CUDA kernels (``bash scripts/build-ort-ops.sh -DHAM_ORT_CUDA=ON``)."""
    cuda_enabled = _diagnostics(library).HamOrtOpsCudaEnabled
    cuda_enabled.argtypes, cuda_enabled.restype = [], ctypes.c_int
    return bool(cuda_enabled())


def cache_copy_stats(library: str | Path | None = None) -> tuple[int, int]:
    """(tensors, bytes) that CacheAppend copied from its cache inputs to its outputs since load or the last reset.

    A step whose caller binds each cache input and its output to one buffer (IOBinding) copies nothing.
    """
    copies, nbytes = ctypes.c_uint64(0), ctypes.c_uint64(0)
    _diagnostics(library).HamOrtOpsCopyStats(ctypes.byref(copies), ctypes.byref(nbytes))
    return copies.value, nbytes.value


def reset_cache_copy_stats(library: str | Path | None = None) -> None:
    """Set the counters of :func:`cache_copy_stats` to zero."""
    _diagnostics(library).HamOrtOpsResetCopyStats()
