"""Checkpoint formats: ``model.pt`` and ``model.safetensors`` + ``config.json``.

``model.pt`` is a plain dict read with ``torch.load(weights_only=True)`` only, so a file that needs arbitrary
unpickling is refused, never executed::

    {"format": "ham-export/model", "format_version": 1, "config": {...HAMConfig...},
     "state_dict": {name: tensor}, "thresholds": [tau per layer], "metadata": {...training facts...}}

``model.safetensors`` holds the same state dict; ``config.json`` beside it holds every other key. Whatever the
form, the loader checks the format and version, validates the config, and requires the weights to match the config
name for name and shape for shape, with finite values.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .config import HAMConfig
from .model import HAMLM

FORMAT = "ham-export/model"
FORMAT_VERSION = 1
CONFIG_JSON = "config.json"
SAFETENSORS = "model.safetensors"


@dataclass
class Checkpoint:
    """A loaded model with what its file said about it."""

    model: HAMLM
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> HAMConfig:
        return self.model.cfg


def weights_sha256(model: HAMLM) -> str:
    """A digest of the weights (names, shapes and fp32 values), to tie an artifact to its checkpoint."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _header(model: HAMLM, metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "thresholds": list(model.cfg.thresholds),
        "metadata": dict(metadata or {}),
    }


def save_pt(model: HAMLM, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.pt``; the metadata must be plain data (str, numbers, lists, dicts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _header(model, metadata)
    payload["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(payload, path)
    return path


def save_safetensors(model: HAMLM, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the safetensors path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / SAFETENSORS, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_JSON).write_text(json.dumps(_header(model, metadata), indent=2) + "\n")
    return directory / SAFETENSORS


def load(path: str | Path) -> Checkpoint:
    """Load a model from ``model.pt``, ``model.safetensors`` (config.json beside it) or a folder holding either.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, needs unpickling of code, has another format
            or version, or its weights do not match its config.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / SAFETENSORS, path / "model.pt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(f"no {SAFETENSORS} or model.pt in folder {path}")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        payload = _read_safetensors(path)
    else:
        payload = _read_pt(path)
    return Checkpoint(_build(payload, path), path, payload.get("metadata") or {})


def _read_pt(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing {path}: it is not a plain-data checkpoint (loading it would need arbitrary unpickling, "
            f"which ham-export never does). Detail: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        # The weights-only unpickler reads untrusted bytes: a damaged file surfaces as whatever exception the
        # damage leads to (KeyError, RuntimeError, EOFError, ...). Each one means the same to the user.
        raise CheckpointError(f"cannot read {path}: truncated or not a torch checkpoint "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a ham-export checkpoint (a dict with a state_dict was expected)")
    return payload


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = path.with_name(CONFIG_JSON)
    if not config_path.is_file():
        raise CheckpointError(f"{path} needs its {CONFIG_JSON} beside it, at {config_path}")
    try:
        header = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    try:
        header["state_dict"] = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({exc})") from None
    return header


def _build(payload: dict[str, Any], path: Path) -> HAMLM:
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {payload.get('format')!r}, expected {FORMAT!r}")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this ham-export reads version {FORMAT_VERSION}")
    try:
        cfg = HAMConfig.from_dict(payload.get("config"))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    thresholds = payload.get("thresholds")
    if (not isinstance(thresholds, (list, tuple)) or len(thresholds) != cfg.n_layers
            or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in thresholds)):
        raise CheckpointError(f"{path}: thresholds must be {cfg.n_layers} finite numbers, got {thresholds!r}")
    if [float(t) for t in thresholds] != list(cfg.thresholds):
        raise CheckpointError(f"{path}: thresholds {list(thresholds)} differ from the config's {list(cfg.thresholds)}")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")

    # The config is checked against the file's tensors before anything is allocated: a config that claims a
    # vocabulary of 10^10 or 10^9 layers is refused, not built.
    layers = {key.split(".")[1] for key in state if key.startswith("blocks.")}
    if len(layers) != cfg.n_layers:
        raise CheckpointError(f"{path}: config.n_layers is {cfg.n_layers:,} but the weights hold {len(layers)} layers")
    with torch.device("meta"):
        expected = HAMLM(cfg, seed=None).state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)} in the file, {tuple(v.shape)} for the config"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k}: dtype {state[k].dtype} is not floating point"
                 for k in expected if k in state and not state[k].is_floating_point()]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{path}: the weights do not match the config: {shown}")
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {', '.join(bad[:5])}")
    model = HAMLM(cfg, seed=None)  # its sizes are now the file's own
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    return model
