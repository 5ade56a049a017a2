"""The manifest of an artifact, ``ham_export.json`` beside its program files: read and validated once, typed.

It names the backend that runs the artifact, the cache capacity, the overflow policy, the dtype, the calibrated
thresholds, the tokenizer, the model's config and weights digest, and for each program every input and output with
its dtype, symbolic shape and meaning; a backend adds its own keys (the op library, the device, the target...),
declared in its :class:`~ham_export.backends.Backend` entry. A C++ app sizes its buffers from it; ``ham-export
check`` picks the runner from it.

:func:`read` checks every field's presence and type once and returns a :class:`Manifest`; a missing, unknown or
wrongly typed field is an :class:`ArtifactError` that names it (exit 2 in the CLI).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import HAMConfig
from ..errors import ConfigError, HamError
from ..ops.spec import POLICIES

MANIFEST = "ham_export.json"
FORMAT = "ham-export/artifact"
FORMAT_VERSION = 1
DTYPES = ("fp32", "fp16")
PROGRAMS = ("prefill", "decode")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(HamError):
    """An artifact that is missing, incomplete, inconsistent or not understood."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a program: its name, dtype, symbolic shape and meaning (the manifest's rows)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    meaning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "meaning": self.meaning}


@dataclass(frozen=True)
class Program:
    """One program of an artifact: the file that holds it (and, in a package of several, its model name)."""

    file: str
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    model_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                               "outputs": [t.to_dict() for t in self.outputs]}
        if self.model_name is not None:
            out["model_name"] = self.model_name
        return out


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``options`` holds the backend's own keys; ``directory`` is where the artifact lies."""

    backend: str
    dtype: str
    capacity: int
    policy: str
    model: HAMConfig
    programs: dict[str, Program]
    model_sha256: str
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.model.thresholds

    def check_weights(self, model: Any) -> None:
        """Refuse a model the artifact was not exported from (its weights' digest differs from ``model_sha256``)."""
        from ..core.checkpoint import weights_sha256

        if self.model_sha256 != weights_sha256(model):
            raise ArtifactError(f"the artifact was exported from other weights (source: {self.source}); export it "
                                f"again from this model")

    def path(self, program: str) -> Path:
        """The file of a program."""
        if self.directory is None:
            raise ArtifactError("this manifest was not read from a folder")
        return self.directory / self.programs[program].file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "dtype": self.dtype,
            "capacity": self.capacity,
            "policy": self.policy,
            "thresholds": list(self.model.thresholds),
            "tokenizer": {"kind": "utf-8 bytes", "vocab_size": self.model.vocab_size},
            "model": self.model.to_dict(),
            "programs": {name: program.to_dict() for name, program in self.programs.items()},
            "model_sha256": self.model_sha256,
            "source": self.source,
            **self.options,
        }

    def write(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


CORE_KEYS = ("format", "format_version", "backend", "dtype", "capacity", "policy", "thresholds", "tokenizer", "model",
             "programs", "model_sha256", "source")


def locate(artifact: str | Path) -> tuple[Path, Path]:
    """(folder, manifest path) of an artifact given as its folder or any file in it."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactError(f"artifact not found: {artifact}")
    directory = artifact if artifact.is_dir() else artifact.parent
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a ham-export artifact: {MANIFEST} is missing")
    return directory, path


def read(artifact: str | Path, backends: Mapping[str, Any]) -> Manifest:
    """Read and validate the manifest of an artifact (its folder or any file in it).

    ``backends`` maps each known backend name to its :class:`~ham_export.backends.Backend`, which says the keys of
    its own and the programs it needs. Every program file must exist.
    """
    directory, path = locate(artifact)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a ham-export artifact manifest")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # True is not version 1
        raise ArtifactError(f"{path} has format version {data.get('format_version')!r}; this ham-export reads "
                            f"{FORMAT_VERSION}")
    backend = data.get("backend")
    if backend not in backends:
        raise ArtifactError(f"{path}: unknown backend {backend!r}; known: {', '.join(backends)}")
    fields = _Fields(path, data)
    dtype = fields.choice("dtype", DTYPES)
    capacity = fields.integer("capacity", minimum=1)
    policy = fields.choice("policy", POLICIES)
    try:
        model = HAMConfig.from_dict(fields.get("model", dict))
    except ConfigError as exc:
        raise ArtifactError(f"{path}: field 'model': {exc}") from None
    thresholds = fields.get("thresholds", list)
    if (len(thresholds) != model.n_layers
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                       for t in thresholds)):
        raise ArtifactError(f"{path}: field 'thresholds' must hold {model.n_layers} finite numbers (one per layer), "
                            f"got {thresholds!r}")
    model = model.with_thresholds(thresholds)
    fields.get("tokenizer", dict)
    sha = fields.get("model_sha256", str)
    if not _SHA256.match(sha):
        raise ArtifactError(f"{path}: field 'model_sha256' must be 64 hex digits, got {sha!r}")
    source = fields.optional("source", str)
    spec = backends[backend]
    programs = {name: _program(path, directory, name, entry)
                for name, entry in fields.get("programs", dict).items()}
    for name in spec.programs:
        if name not in programs:
            raise ArtifactError(f"{path}: the manifest names no {name} program")
    options = {}
    for key, value in data.items():
        if key in CORE_KEYS:
            continue
        if key not in spec.manifest_keys:
            raise ArtifactError(f"{path}: unknown field {key!r} for a {backend} artifact")
        expected = spec.manifest_keys[key]
        if value is not None and not isinstance(value, expected):
            raise ArtifactError(f"{path}: field {key!r} must be {_type_name(expected)}, got {type(value).__name__}")
        options[key] = value
    return Manifest(backend=backend, dtype=dtype, capacity=capacity, policy=policy, model=model, programs=programs,
                    model_sha256=sha, source=source, options=options, directory=directory)


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join({"str": "a string", "dict": "an object", "list": "a list", "int": "an integer",
                        "bool": "true or false", "float": "a number"}.get(t.__name__, t.__name__) for t in types)


class _Fields:
    """Typed access to the manifest's fields, each failure naming the field."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def get(self, key: str, kind: type) -> Any:
        if key not in self.data:
            raise ArtifactError(f"{self.path}: the manifest lacks {key!r}")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ArtifactError(f"{self.path}: field {key!r} must be {_type_name(kind)}, got {value!r}")
        return value

    def optional(self, key: str, kind: type) -> Any:
        return None if self.data.get(key) is None else self.get(key, kind)

    def integer(self, key: str, minimum: int) -> int:
        value = self.get(key, int)
        if value < minimum:
            raise ArtifactError(f"{self.path}: field {key!r} must be at least {minimum}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise ArtifactError(f"{self.path}: field {key!r} must be one of {', '.join(choices)}, got {value!r}")
        return value


def _program(path: Path, directory: Path, name: str, entry: Any) -> Program:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise ArtifactError(f"{path}: program {name!r} must be an object with a 'file'")
    file = directory / entry["file"]
    if not file.is_file():
        raise ArtifactError(f"{name} program missing: {file}")

    def tensors(kind: str) -> tuple[TensorInfo, ...]:
        rows = entry.get(kind, [])
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("dtype"), str)
                and isinstance(r.get("shape"), list) for r in rows):
            raise ArtifactError(f"{path}: programs.{name}.{kind} must be a list of {{name, dtype, shape}} objects")
        return tuple(TensorInfo(r["name"], r["dtype"], tuple(r["shape"]), str(r.get("meaning", ""))) for r in rows)

    model_name = entry.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise ArtifactError(f"{path}: programs.{name}.model_name must be a string")
    return Program(entry["file"], tensors("inputs"), tensors("outputs"), model_name)
