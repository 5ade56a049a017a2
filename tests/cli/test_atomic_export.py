"""An export puts its artifact in place whole or not at all: killed at any point (SIGKILL), interrupted (SIGINT,
SIGTERM: exit 130), or refused (another export holds the folder's lock, or the folder is not an artifact), the
folder holds the old artifact or the complete new one, never a mix and never half of one."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ham_export.backends import MANIFEST, read_manifest
from ham_export.core import checkpoint

from ..conftest import make_small_model

OLD, NEW = 16, 24  # the capacities of the artifact in place and of the one an export writes over it


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return checkpoint.save_pt(make_small_model(), tmp_path_factory.mktemp("atomic") / "model.pt")


def _as_at_a_terminal() -> None:
    """In the child: SIGINT at its default, as a command started at a terminal has it (a test run started in the
    background inherits it ignored, and Python then never turns it into KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def export(model_path, out, capacity):
    command = [sys.executable, "-c", "from ham_export.cli import main; main()", "onnx", str(model_path), "-o",
               str(out), "--ops", "standard", "--max-cache", str(capacity)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_at_a_terminal)


def finished(model_path, out, capacity) -> None:
    proc = export(model_path, out, capacity)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-600:]


def state(out: Path) -> tuple[int, set[str]]:
    """(capacity, files) of the artifact at ``out``, which must be complete: its manifest reads and names files
    that are all there, and nothing else is there."""
    manifest = read_manifest(out)
    files = {p.name for p in out.iterdir()}
    assert files == {MANIFEST, *(program.file for program in manifest.programs.values())}, files
    return manifest.capacity, files


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_killed_at_any_point_leaves_the_old_or_the_new_artifact(model_path, tmp_path):
    out = tmp_path / "art"
    finished(model_path, out, OLD)
    seen = set()
    for delay in (1.0, 3.0, 5.0, 7.0, 9.0, 11.0):
        proc = export(model_path, out, NEW if len(seen) % 2 == 0 else OLD)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        capacity, _ = state(out)
        assert capacity in (OLD, NEW)
        seen.add(capacity)
    finished(model_path, out, NEW)
    assert state(out)[0] == NEW


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_exits_130_and_keeps_the_old_artifact(model_path, tmp_path, signum):
    out = tmp_path / "art"
    finished(model_path, out, OLD)
    before = (out / MANIFEST).read_bytes()
    proc = export(model_path, out, NEW)
    deadline = time.monotonic() + 120
    while not leftovers(out):  # the hidden build folder: the export is under way (for several seconds)
        assert proc.poll() is None and time.monotonic() < deadline, "the export never started building"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-600:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "error: interrupted"
    assert (out / MANIFEST).read_bytes() == before and state(out)[0] == OLD
    assert leftovers(out) == []


def test_a_second_export_into_a_locked_folder_is_refused(model_path, tmp_path):
    out = tmp_path / "art"
    finished(model_path, out, OLD)
    with open(tmp_path / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running export holds it
        proc = export(model_path, out, NEW)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "another ham-export is writing" in stderr, stderr[-600:]
    assert state(out)[0] == OLD and leftovers(out) == []


def test_a_folder_that_is_not_an_artifact_is_never_replaced(model_path, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = export(model_path, out, NEW)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "is not a ham-export artifact" in stderr, stderr[-600:]
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["notes.txt"]
    manifest = tmp_path / "fresh" / MANIFEST
    finished(model_path, manifest.parent, NEW)
    assert json.loads(manifest.read_text())["capacity"] == NEW
