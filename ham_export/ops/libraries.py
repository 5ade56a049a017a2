"""The compiled libraries of the HAM ops, and where they are found.

- ONNX Runtime: ``libham_ort_ops.so`` (``runtimes/onnxruntime``), domain ``ham.ai``, built by
  ``bash scripts/build-ort-ops.sh``;
- libtorch: ``libham_torch_ops.so`` (``runtimes/libtorch``), namespace ``ham``, for C++ processes, built by
  ``bash scripts/build-torch-ops.sh``;
- TensorRT: ``libham_trt_plugins.so`` (``plugins_trt/cpp``), the IPluginV3 plugins in namespace ``ham_cpp``, built
  by ``bash scripts/build-trt-plugins.sh`` where TensorRT's headers are.

A library is found, in order: at the file its environment variable names (``HAM_ORT_OPS_LIB``,
``HAM_TORCH_OPS_LIB``, ``HAM_TRT_PLUGINS_LIB``), then next to the installed package, in ``ham_export/lib/`` (where
the build scripts put it, and so what a wheel built after them carries). Otherwise :meth:`OpLibrary.require` raises an
:class:`OpLibraryError` that names the place it looked and the build command.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HamError

if TYPE_CHECKING:
    import onnxruntime

PACKAGE_LIB = Path(__file__).resolve().parents[1] / "lib"


class OpLibraryError(HamError):
    """An op library that is missing or that its runtime cannot load."""


@dataclass(frozen=True)
class OpLibrary:
    """One compiled op library: its file name, the environment variable that can name it, how to build it."""

    file: str
    env: str
    build: str
    runtime: str

    def path(self) -> Path:
        """Where the library is looked for: ``$<env>`` when set, else ``ham_export/lib/<file>``."""
        override = os.environ.get(self.env)
        return Path(override).expanduser().resolve() if override else PACKAGE_LIB / self.file

    def require(self, path: str | Path | None = None) -> Path:
        """``path`` (or :meth:`path`), which must be a file; else an error naming the place and the build."""
        lib = Path(path).expanduser().resolve() if path is not None else self.path()
        if not lib.is_file():
            origin = f" (from ${self.env})" if path is None and os.environ.get(self.env) else ""
            raise OpLibraryError(f"{self.runtime} op library not found at {lib}{origin}; build it with {self.build} "
                                 f"(or name it with ${self.env})")
        return lib

    def to_manifest(self, **extra: object) -> dict[str, object]:
        """The manifest's ``op_library`` entry."""
        return {"name": self.file, **extra, "env": self.env, "build": self.build}


ORT = OpLibrary("libham_ort_ops.so", "HAM_ORT_OPS_LIB", "bash scripts/build-ort-ops.sh", "ONNX Runtime")
TORCH = OpLibrary("libham_torch_ops.so", "HAM_TORCH_OPS_LIB", "bash scripts/build-torch-ops.sh", "libtorch")
TRT = OpLibrary("libham_trt_plugins.so", "HAM_TRT_PLUGINS_LIB", "bash scripts/build-trt-plugins.sh", "TensorRT")


def ort_session_options(options: onnxruntime.SessionOptions | None = None, *,
                        library: str | Path | None = None) -> onnxruntime.SessionOptions:
    """Session options with the ``ham.ai`` op library registered.

    Args:
        options: options to register the library with (a new ``SessionOptions`` when None); returned.
        library: the library file; :meth:`OpLibrary.path` of :data:`ORT` when None.

    Raises:
        OpLibraryError: the file is missing, or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    lib = ORT.require(library)
    options = options if options is not None else ort.SessionOptions()
    try:
        options.register_custom_ops_library(str(lib))
    except ort.capi.onnxruntime_pybind11_state.Fail as e:
        raise OpLibraryError(f"ONNX Runtime cannot load the op library {lib}: {e}; rebuild it with {ORT.build}"
                             ) from e
    return options


def _diagnostics(library: str | Path | None) -> ctypes.CDLL:
    # The same file ONNX Runtime loaded: dlopen hands back that copy, so the counters are the ones the kernels bump.
    lib = ctypes.CDLL(str(ORT.require(library)))
    lib.HamOrtOpsCopyStats.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
    lib.HamOrtOpsCopyStats.restype = None
    lib.HamOrtOpsResetCopyStats.argtypes = []
    lib.HamOrtOpsResetCopyStats.restype = None
    return lib


def ort_has_cuda_kernels(library: str | Path | None = None) -> bool:
    """Whether the ONNX Runtime library was built with its CUDA kernels (``-DHAM_ORT_CUDA=ON``)."""
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
