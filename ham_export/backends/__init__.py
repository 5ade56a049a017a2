"""The backends: each turns a HAM model into an artifact and runs it, behind one registry.

A backend is one module of this package that builds an artifact (``build``: model -> a folder or package with its
programs and the manifest ``ham_export.json``) and opens one (a :class:`~ham_export.backends.base.Runner`), and
registers itself once with :func:`register`. :data:`MODULES` lists those modules: adding a backend is one module and
one entry there (and one fixture entry in ``tests/backends/conftest.py``, so that the parity suite runs it). The
CLI makes one export command per backend, and ``check``, ``memory`` and :func:`load_runner` ask the registry.

Importing a backend module is cheap: the heavy imports (onnx, onnxruntime, tvm, triton) happen in its builder and
runner.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .base import Backend, Option, Output, Runner
from .manifest import MANIFEST, ArtifactError, Manifest

log = logging.getLogger(__name__)

MODULES = ("torch_export", "onnxruntime", "aotinductor", "tvm", "triton", "tensorrt")
"""The backend modules, in the order the CLI lists them."""

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (once per name)."""
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def registry() -> dict[str, Backend]:
    """Every registered backend by name, in the order of :data:`MODULES` (their modules are imported here)."""
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")  # a no-op once imported
    order = {f"{__name__}.{module}": i for i, module in enumerate(MODULES)}
    return dict(sorted(_REGISTRY.items(), key=lambda item: order.get(item[1].build.__module__, len(order))))


def get(name: str) -> Backend:
    backends = registry()
    if name not in backends:
        raise ArtifactError(f"unknown backend {name!r}; known: {', '.join(backends)}")
    return backends[name]


def read_manifest(artifact: str | Path) -> Manifest:
    """The validated manifest of an artifact (its folder or any file in it)."""
    from . import manifest

    return manifest.read(artifact, registry())


def load_runner(artifact: str | Path) -> Runner:
    """The runner of an artifact, chosen by its manifest's backend; unopened (``with load_runner(path) as r:``)."""
    manifest = read_manifest(artifact)
    backend = get(manifest.backend)
    reason = backend.requires()
    if reason is not None:
        raise ArtifactError(f"{manifest.directory} is a {backend.name} artifact, which cannot run here: {reason}")
    log.info("loading %s artifact from %s", backend.name, manifest.directory)
    return backend.runner(manifest)


__all__ = ["MANIFEST", "MODULES", "ArtifactError", "Backend", "Manifest", "Option", "Output", "Runner", "get",
           "load_runner", "read_manifest", "register", "registry"]
