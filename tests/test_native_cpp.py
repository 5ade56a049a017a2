"""The C++ runner of AOTInductor packages (examples/cpp/aoti_greedy): built with cmake against the torch wheel's
libtorch, together with the op library (runtimes/libtorch), it loads a native package of the bundled model and
decodes greedily; its tokens must equal greedy decoding with eager PyTorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ham_export import checkpoint
from ham_export.export import export_native
from ham_export.generate import greedy
from ham_export.runners import EagerRunner

ROOT = Path(__file__).parents[1]
SOURCE = ROOT / "examples" / "cpp" / "aoti"
BUNDLED = ROOT / "examples" / "models" / "tiny-ham.pt"
CAPACITY = 64
STEPS = 40
# (prompt, whether it fills the cache): the long one routes up to 98 tokens a layer, so drop applies.
PROMPTS = [("Hello world", False), ("the cat sat on the mat. " * 6 + "café ∑", True)]


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build examples/cpp/aoti (apt-get install cmake)")
    build = tmp_path_factory.mktemp("aoti-build")
    for command in (["cmake", "-S", str(SOURCE), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                    ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    assert (build / "libham_torch_ops.so").is_file()  # next to the program, where it looks first
    return build / "aoti_greedy"


@pytest.fixture(scope="module")
def bundled():
    return checkpoint.load(BUNDLED).model


@pytest.fixture(scope="module")
def package(tmp_path_factory, bundled) -> Path:
    return export_native(bundled, tmp_path_factory.mktemp("native") / "model.pt2", CAPACITY, "drop")


def run(program: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("aoti_greedy: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize(("prompt", "overflows"), PROMPTS, ids=["short", "long-utf8-overflow"])
def test_cpp_tokens_match_eager(program, package, bundled, prompt, overflows):
    result = run(program, package, prompt, STEPS)
    assert result.returncode == 0, result.stderr
    tokens = [int(t) for t in result.stdout.split()]

    eager = EagerRunner(bundled, CAPACITY, "drop")
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.int64)
    expected, outputs = greedy(eager, ids, STEPS, torch.tensor(bundled.cfg.thresholds))
    assert len(tokens) == STEPS
    assert tokens == expected[0].tolist()
    assert any(int(o.overflow.sum()) > 0 for o in outputs) == overflows


def test_cpp_package_folder_and_zero_steps(program, package):
    result = run(program, package.parent, "hi", 0)  # the folder holding model.pt2 works as well
    assert result.returncode == 0 and result.stdout.strip() == "", result.stderr


def test_cpp_bad_arguments(program, package, tmp_path):
    for args in [(package, "hi"), (package, "hi", "x"), (package, "hi", -1), (package, "", 3), ("--ops",),
                 (tmp_path, "hi", 3), (tmp_path / "model.pt2", "hi", 3)]:
        assert_usage_error(run(program, *args))
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(package, lone / "model.pt2")  # no manifest beside it
    assert_usage_error(run(program, lone / "model.pt2", "hi", 3), "ham_export.json")


def test_cpp_missing_or_wrong_op_library(program, package, tmp_path):
    alone = tmp_path / "aoti_greedy"
    shutil.copy(program, alone)  # no libham_torch_ops.so next to this copy
    assert_usage_error(run(alone, package, "hi", 3), f"op library not found at {tmp_path}/libham_torch_ops.so",
                       "scripts/build-torch-ops.sh")
    assert_usage_error(run(program, "--ops", tmp_path / "none.so", package, "hi", 3), "op library not found")
    not_elf = tmp_path / "libham_torch_ops.so"
    not_elf.write_text("not a library\n")
    assert_usage_error(run(alone, package, "hi", 3), "cannot load the op library")
    result = run(alone, "--ops", program.parent / "libham_torch_ops.so", package, "hi", 3)
    assert result.returncode == 0 and len(result.stdout.split()) == 3, result.stderr


def test_cpp_damaged_package_is_a_runtime_error(program, package, tmp_path):
    shutil.copy(package.parent / "ham_export.json", tmp_path)
    (tmp_path / "model.pt2").write_bytes(package.read_bytes()[:4096])
    result = run(program, tmp_path / "model.pt2", "hi", 3)
    assert result.returncode == 1 and result.stderr.startswith("aoti_greedy: "), result.stderr
