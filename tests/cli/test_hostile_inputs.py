"""Bad input, as a hostile new user gives it, through the real command line (a child process each, so that what a
user sees is what is checked): every case exits with its code and one plain line on stderr that names the problem,
never a traceback, and leaves nothing half-written.

One table: (id, how the inputs are made, the command, the exit code, a phrase of the message). The artifacts are a
small model's opset-27 ONNX export (no op library needed) and copies of it with one thing broken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ham_export.backends import MANIFEST, registry
from ham_export.core import checkpoint

from ..conftest import make_small_model

CAPACITY = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files every case starts from: a checkpoint, one from other weights, and an artifact of the first."""
    root = tmp_path_factory.mktemp("hostile")
    model = make_small_model()
    other = make_small_model()
    other.reset_parameters(seed=123)
    paths = {
        "model": checkpoint.save_pt(model, root / "model.pt"),
        "other": checkpoint.save_pt(other, root / "other.pt"),
        "artifact": registry()["onnxruntime"].build(model, root / "artifact", capacity=CAPACITY, policy="drop",
                                                    ops="standard"),
        "exported": registry()["torch.export"].build(model, root / "exported", capacity=CAPACITY, policy="drop"),
        "root": root,
    }
    return paths


def tampered(world, name: str, edit, source: str = "artifact") -> Path:
    """A copy of the artifact (or of ``world[source]``) whose manifest ``edit(data)`` changed (in place)."""
    folder = world["root"] / f"tampered-{name}"
    if not folder.exists():
        shutil.copytree(world[source], folder)
        data = json.loads((folder / MANIFEST).read_text())
        edit(data)
        (folder / MANIFEST).write_text(json.dumps(data))
    return folder


def swapped(world, source: str = "artifact", suffix: str = ".onnx") -> Path:
    folder = world["root"] / f"swapped-{source}"
    if not folder.exists():
        shutil.copytree(world[source], folder)
        shutil.copy(folder / f"prefill{suffix}", folder / f"decode{suffix}")
    return folder


def with_field(key, value):
    def edit(data):
        data[key] = value
    return edit


def without(key):
    def edit(data):
        del data[key]
    return edit


def config_checkpoint(world, name: str, **config) -> Path:
    """A checkpoint file whose config says ``config`` (its weights stay the small model's)."""
    import torch

    path = world["root"] / f"config-{name}.pt"
    if not path.exists():
        payload = torch.load(world["model"], weights_only=True)
        payload["config"].update(config)
        if "n_layers" in config:  # and no thresholds: the config alone says how many layers
            del payload["config"]["thresholds"]
        torch.save(payload, path)
    return path


def big_prompts(world) -> Path:
    path = world["root"] / "prompts.txt"
    if not path.exists():
        path.write_text(("x" * 5000 + "\n") * 2000)
    return path


def a_file(world) -> Path:
    path = world["root"] / "a-file"
    path.write_text("not a folder")
    return path


# (id, command as a function of the world, exit code, phrase)
CASES = [
    ("check-rtol-nan", lambda w: ["check", w["model"], w["artifact"], "--rtol", "nan"], 2, "--rtol"),
    ("check-atol-nan", lambda w: ["check", w["model"], w["artifact"], "--atol", "nan"], 2, "--atol"),
    ("check-atol-inf", lambda w: ["check", w["model"], w["artifact"], "--atol", "inf"], 2, "--atol"),
    ("check-margin-negative", lambda w: ["check", w["model"], w["artifact"], "--margin", "-1"], 2, "--margin"),
    ("check-other-weights", lambda w: ["check", w["other"], w["artifact"]], 2, "other weights"),
    ("check-steps-huge", lambda w: ["check", w["model"], w["artifact"], "--steps", str(10**9)], 2, "--steps"),
    ("check-prompts-huge", lambda w: ["check", w["model"], w["artifact"], "--prompts", big_prompts(w)], 2,
     "prompts"),
    ("manifest-capacity-lie", lambda w: ["check", w["model"], tampered(w, "cap", with_field("capacity", 128))], 2,
     "capacity"),
    ("manifest-capacity-zero", lambda w: ["check", w["model"], tampered(w, "cap0", with_field("capacity", 0))], 2,
     "capacity"),
    ("manifest-capacity-string", lambda w: ["check", w["model"], tampered(w, "caps", with_field("capacity", "16"))],
     2, "capacity"),
    ("manifest-dtype-lie", lambda w: ["check", w["model"], tampered(w, "dt", with_field("dtype", "fp16"))], 2,
     "dtype"),
    ("manifest-dtype-unknown", lambda w: ["check", w["model"], tampered(w, "dtu", with_field("dtype", "fp8"))], 2,
     "dtype"),
    ("manifest-no-sha", lambda w: ["check", w["model"], tampered(w, "nosha", without("model_sha256"))], 2,
     "model_sha256"),
    ("manifest-format-version-true", lambda w: ["check", w["model"],
                                                tampered(w, "fvt", with_field("format_version", True))], 2,
     "format version"),
    ("manifest-unknown-field", lambda w: ["check", w["model"], tampered(w, "unk", with_field("colour", "red"))], 2,
     "colour"),
    ("decode-is-prefill", lambda w: ["check", w["model"], swapped(w)], 2, "decode.onnx"),
    ("exported-decode-is-prefill", lambda w: ["check", w["model"], swapped(w, "exported", ".pt2")], 2,
     "decode.pt2"),
    ("exported-capacity-lie", lambda w: ["check", w["model"], tampered(w, "te-cap", with_field("capacity", 32),
                                                                        "exported")], 2, "capacity 32"),
    ("exported-dtype-lie", lambda w: ["check", w["model"], tampered(w, "te-dt", with_field("dtype", "fp16"),
                                                                       "exported")], 2, "dtype fp16"),
    ("memory-artifact-other-weights", lambda w: ["memory", w["other"], "--artifact", w["artifact"],
                                                 "--thresholds", "0.5"], 2, "other weights"),
    ("memory-plot-missing-folder", lambda w: ["memory", w["model"], "--context", "64", "--thresholds", "0.5",
                                              "--plot", w["root"] / "nowhere" / "m.png"], 2, "nowhere"),
    ("onnx-max-cache-huge", lambda w: ["onnx", w["model"], "-o", w["root"] / "huge", "--max-cache", str(10**12)],
     2, "--max-cache"),
    ("onnx-out-under-a-file", lambda w: ["onnx", w["model"], "-o", a_file(w) / "sub", "--max-cache", "8"], 2,
     "a-file"),
    ("eval-window-huge", lambda w: ["eval", w["model"], "--window", str(10**12)], 2, "--window"),
    ("eval-too-many-thresholds", lambda w: ["eval", w["model"], *["--threshold", "0.5"] * 3000], 2, "--threshold"),
    ("checkpoint-vocab-huge", lambda w: ["inspect", config_checkpoint(w, "vocab", vocab_size=10**10)], 2,
     "vocab_size"),
    ("checkpoint-vocab-large", lambda w: ["inspect", config_checkpoint(w, "vocab2", vocab_size=10**8)], 2,
     "weights do not match"),
    ("checkpoint-layers-huge", lambda w: ["inspect", config_checkpoint(w, "layers", n_layers=10**9)], 2,
     "n_layers"),
    ("checkpoint-d-model-huge", lambda w: ["inspect", config_checkpoint(w, "dmodel", d_model=10**5)], 2,
     "weights do not match"),
    ("markup-in-a-path", lambda w: ["check", w["model"], w["root"] / "x[/]y[red]z"], 2, "x[/]y[red]z"),
]


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from ham_export.cli import main; main()", *map(str, args)]
    env = {**os.environ, "COLUMNS": "80"}
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(map(str, args[:6]))} ...: no answer in {timeout:g} s", pytrace=False)


@pytest.mark.parametrize(("make", "code", "phrase"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_one_clear_line(world, make, code, phrase):
    proc = cli(*make(world))
    assert proc.returncode == code, (proc.returncode, proc.stderr[-600:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-600:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-600:]
    assert phrase in lines[0], lines[0]
