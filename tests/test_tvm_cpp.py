"""The C++ runner (examples/cpp/tvm_greedy): built with cmake against the wheels' tvm-ffi runtime, it loads a TVM
artifact of the bundled model and decodes greedily; its tokens must equal greedy decoding with eager PyTorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'ham-export[tvm]')")

from ham_export import checkpoint
from ham_export.generate import greedy
from ham_export.runners import EagerRunner
from ham_export.tvm_backend import export_tvm

ROOT = Path(__file__).parents[1]
SOURCE = ROOT / "examples" / "cpp"
BUNDLED = ROOT / "examples" / "models" / "tiny-ham.pt"
CAPACITY = 64
STEPS = 40
# (prompt, whether it fills the cache): the long one routes up to 98 tokens a layer, so drop applies.
PROMPTS = [("Hello world", False), ("the cat sat on the mat. " * 6 + "café ∑", True)]


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build examples/cpp (apt-get install cmake)")
    build = tmp_path_factory.mktemp("cpp-build")
    subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, text=True)
    return build / "tvm_greedy"


@pytest.fixture(scope="module")
def bundled():
    return checkpoint.load(BUNDLED).model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, bundled) -> Path:
    return export_tvm(bundled, tmp_path_factory.mktemp("tvm-cpp"), CAPACITY, "drop")


def run(program: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(("prompt", "overflows"), PROMPTS, ids=["short", "long-utf8-overflow"])
def test_cpp_tokens_match_eager(program, artifact, bundled, prompt, overflows):
    result = run(program, artifact, prompt, STEPS)
    assert result.returncode == 0, result.stderr
    tokens = [int(t) for t in result.stdout.split()]

    eager = EagerRunner(bundled, CAPACITY, "drop")
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.int64)
    expected, outputs = greedy(eager, ids, STEPS, torch.tensor(bundled.cfg.thresholds))
    assert len(tokens) == STEPS
    assert tokens == expected[0].tolist()
    assert any(int(o.overflow.sum()) > 0 for o in outputs) == overflows


def test_cpp_zero_steps_and_bad_arguments(program, artifact, tmp_path):
    result = run(program, artifact, "hi", 0)
    assert result.returncode == 0 and result.stdout.strip() == ""
    for args in [(artifact, "hi"), (artifact, "hi", "x"), (artifact, "", 3), (tmp_path, "hi", 3)]:
        result = run(program, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("tvm_greedy: ")
