"""The GPU benchmark (``kernels/bench.py``, run as ``python -m ham_export.kernels.bench``) runs end to end on the CPU
in its smoke mode (under the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .support import ROOT, interpreted

interpreted("ham_export.kernels.decode_step")  # skips this module without Triton


def _run(*args: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "ham_export.kernels.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_smoke_run_prints_one_row_per_capacity_and_fill():
    run = _run("--smoke", interpret=True)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("cpu (Triton interpreter), fp16")
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1:3] for r in rows] == [[" 64 ", " 10% "], [" 64 ", " 100% "], [" 100 ", " 10% "],
                                                 [" 100 ", " 100% "]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_full_run_is_refused_with_a_reason():
    run = _run(interpret=False)
    assert run.returncode != 0
    assert "no CUDA GPU is visible" in run.stderr
