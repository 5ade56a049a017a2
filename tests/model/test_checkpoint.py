"""Checkpoints round-trip, and every unsafe or inconsistent file is refused before anything runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ham_export.core import checkpoint
from ham_export.errors import CheckpointError

from ..conftest import make_small_model


@pytest.fixture
def model():
    m = make_small_model()
    m.cfg = m.cfg.with_thresholds([0.3, 0.7])
    return m


def same_outputs(a, b):
    toks = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(toks)[0], b(toks)[0])


def test_pt_round_trip(model, tmp_path):
    path = checkpoint.save_pt(model, tmp_path / "m.pt", {"note": "x"})
    loaded = checkpoint.load(path)
    assert loaded.config == model.cfg
    assert loaded.metadata == {"note": "x"}
    assert same_outputs(model, loaded.model)


def test_safetensors_round_trip(model, tmp_path):
    path = checkpoint.save_safetensors(model, tmp_path / "m", {"note": "y"})
    for target in (path, tmp_path / "m"):
        loaded = checkpoint.load(target)
        assert loaded.config.thresholds == (0.3, 0.7)
        assert same_outputs(model, loaded.model)


class Payload:
    """An object whose unpickling would run code (creating a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_in_a_pickle_is_refused_not_run(model, tmp_path):
    marker = str(tmp_path / "pwned")
    payload = {"format": checkpoint.FORMAT, "format_version": 1, "config": model.cfg.to_dict(),
               "thresholds": list(model.cfg.thresholds), "state_dict": model.state_dict(), "metadata": Payload(marker)}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        checkpoint.load(path)
    assert not os.path.exists(marker)


def test_truncated_and_foreign_files_are_refused(model, tmp_path):
    path = checkpoint.save_pt(model, tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "text.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a ham-export checkpoint"):
        checkpoint.load(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def rewrite(model, path, **changes):
    payload = {"format": checkpoint.FORMAT, "format_version": 1, "config": model.cfg.to_dict(),
               "thresholds": list(model.cfg.thresholds), "state_dict": dict(model.state_dict()), "metadata": {}}
    payload.update(changes)
    torch.save(payload, path)
    return path


def test_wrong_version_format_or_config_is_refused(model, tmp_path):
    with pytest.raises(CheckpointError, match="format version 2"):
        checkpoint.load(rewrite(model, tmp_path / "v.pt", format_version=2))
    with pytest.raises(CheckpointError, match="format"):
        checkpoint.load(rewrite(model, tmp_path / "f.pt", format="other"))
    bigger = {**model.cfg.to_dict(), "d_model": 48}
    with pytest.raises(CheckpointError, match=r"do not match the config.*shape"):
        checkpoint.load(rewrite(model, tmp_path / "c.pt", config=bigger))
    with pytest.raises(CheckpointError, match="unknown config field"):
        checkpoint.load(rewrite(model, tmp_path / "u.pt", config={**model.cfg.to_dict(), "heads": 3}))
    with pytest.raises(CheckpointError, match="router"):
        checkpoint.load(rewrite(model, tmp_path / "r.pt", config={**model.cfg.to_dict(), "router": "magic"}))
    with pytest.raises(CheckpointError, match="thresholds"):
        checkpoint.load(rewrite(model, tmp_path / "t.pt", thresholds=[0.1]))
    state = dict(model.state_dict())
    state.pop("embed.weight")
    with pytest.raises(CheckpointError, match=r"missing embed\.weight"):
        checkpoint.load(rewrite(model, tmp_path / "s.pt", state_dict=state))


def test_non_finite_weights_are_refused(model, tmp_path):
    state = dict(model.state_dict())
    state["norm_out.weight"] = torch.full_like(state["norm_out.weight"], float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoint.load(rewrite(model, tmp_path / "n.pt", state_dict=state))


def test_safetensors_needs_a_valid_config_beside_it(model, tmp_path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        checkpoint.load(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"format": checkpoint.FORMAT, "format_version": 1}))
    with pytest.raises(CheckpointError, match="config"):
        checkpoint.load(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(tmp_path / "model.safetensors")
