"""The manifest of an exported artifact: ``ham_export.json`` beside the program files.

It names the backend that runs the artifact and, for each program, every input and output with its dtype,
symbolic shape and meaning, plus the cache capacity, the overflow policy, the calibrated thresholds, the
tokenizer and the op library the graph needs. A C++ app sizes its buffers from it; ``ham-export check`` picks the
runner from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import HAMConfig
from .errors import HamError

MANIFEST = "ham_export.json"
FORMAT = "ham-export/artifact"
FORMAT_VERSION = 1
BACKENDS = ("torch.export", "onnxruntime", "tvm", "aotinductor")


class ArtifactError(HamError):
    """An artifact folder that is missing, incomplete or not understood."""


def build(backend: str, model_config: HAMConfig, capacity: int, policy: str, dtype: str,
          programs: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest. ``programs`` maps ``prefill`` / ``decode`` to {"file", "inputs", "outputs"}."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "dtype": dtype,
        "capacity": capacity,
        "policy": policy,
        "thresholds": list(model_config.thresholds),
        "tokenizer": {"kind": "utf-8 bytes", "vocab_size": model_config.vocab_size},
        "model": model_config.to_dict(),
        "programs": programs,
        **(extra or {}),
    }


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read(artifact: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest) of an artifact given as its folder or any file in it; checks that the files exist."""
    artifact = Path(artifact)
    directory = artifact if artifact.is_dir() else artifact.parent
    path = directory / MANIFEST
    if not artifact.exists():
        raise ArtifactError(f"artifact not found: {artifact}")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a ham-export artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a ham-export artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')!r}; this ham-export reads "
                            f"{FORMAT_VERSION}")
    if manifest.get("backend") not in BACKENDS:
        raise ArtifactError(f"{path}: unknown backend {manifest.get('backend')!r}; known: {', '.join(BACKENDS)}")
    for key in ("capacity", "policy", "dtype", "model", "programs"):
        if key not in manifest:
            raise ArtifactError(f"{path}: the manifest lacks {key!r}")
    for name in ("prefill", "decode"):
        program = manifest["programs"].get(name) if isinstance(manifest["programs"], dict) else None
        if not isinstance(program, dict) or "file" not in program:
            raise ArtifactError(f"{path}: the manifest names no {name} program")
        file = directory / program["file"]
        if not file.is_file():
            raise ArtifactError(f"{name} program missing: {file}")
    return directory, manifest
