"""Prepared TensorRT folders (``ham-export trt --prepare-only``) of a small model, shared by the tests here, and a
child-process runner for what needs Triton's compiler (PTX) instead of its interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ham_export.core import checkpoint

from ..conftest import make_small_model

ROOT = Path(__file__).resolve().parents[2]
CAPACITY = 12


def compiled_env() -> dict[str, str]:
    """The environment of a child that compiles kernels: TRITON_INTERPRET unset, the source tree importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_compiled(code: str, *args: str, timeout: int = 900) -> dict:
    """Run ``code`` in a child with compiled kernels; it prints one JSON line last, returned here."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=compiled_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``ham-export`` in a child with compiled kernels."""
    return subprocess.run([sys.executable, "-m", "ham_export.cli", *map(str, args)], cwd=ROOT, env=compiled_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    model = make_small_model("learned")
    model.cfg = model.cfg.with_thresholds([0.4, 0.6])
    return checkpoint.save_pt(model, tmp_path_factory.mktemp("trt-ckpt") / "small.pt")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, small_checkpoint) -> dict[str, Path]:
    """Folders for both plugin modes: qdp in fp16 with PTX for sm_87, sm_89, sm_90 (evict); cpp in fp32 (drop)."""
    folders = {}
    for mode, extra in (("qdp", ("--dtype", "fp16", "--arch", "87,89,90", "--policy", "evict")),
                        ("cpp", ("--dtype", "fp32", "--policy", "drop"))):
        out = tmp_path_factory.mktemp(f"trt-{mode}")
        proc = cli("trt", small_checkpoint, "-o", out, "--plugins", mode, "--max-cache", CAPACITY, "--prepare-only",
                   "--max-batch", "4", "--max-prompt", "64", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("prepared "), proc.stderr
        folders[mode] = out
    return folders
