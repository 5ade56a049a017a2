"""What the tests of the C++ greedy decoders (examples/cpp: tvm_greedy, aoti_greedy, ort_greedy) share: the
bundled model and the prompts, building a CMake project, running a program, and checking its tokens against eager
PyTorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ham_export.backends.eager import EagerRunner
from ham_export.backends.generate import greedy

ROOT = Path(__file__).parents[2]
BUNDLED = ROOT / "examples" / "models" / "tiny-ham.pt"
CAPACITY = 64
STEPS = 40
# (prompt, whether it fills the cache): the long one routes up to 98 tokens a layer, so drop applies.
PROMPTS = [("Hello world", False), ("the cat sat on the mat. " * 6 + "café ∑", True)]
PROMPT_IDS = ["short", "long-utf8-overflow"]


def cmake_build(source: Path, build: Path) -> None:
    """Configures and builds the CMake project in source (for this Python's packages) into build."""
    if shutil.which("cmake") is None:
        pytest.fail(f"cmake is needed to build {source.relative_to(ROOT)} (apt-get install cmake)")
    for command in (["cmake", "-S", str(source), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                    ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def run(program: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def assert_tokens_match_eager(program: Path, artifact: Path, bundled, prompt: str, overflows: bool, extra=()
                              ) -> subprocess.CompletedProcess:
    """program (given ``extra`` arguments first), run on the artifact of the bundled model, prints the STEPS tokens of
    greedy decoding with eager PyTorch; the cache overflows while decoding iff overflows. Returns the run."""
    result = run(program, *extra, artifact, prompt, STEPS)
    assert result.returncode == 0, result.stderr
    tokens = [int(t) for t in result.stdout.splitlines()[0].split()]  # the first line; a program may add others

    eager = EagerRunner(bundled, CAPACITY, "drop")
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.int64)
    expected, outputs = greedy(eager, ids, STEPS, torch.tensor(bundled.cfg.thresholds))
    assert len(tokens) == STEPS
    assert tokens == expected[0].tolist()
    assert any(int(o.overflow.sum()) > 0 for o in outputs) == overflows
    return result
