"""The C++ runner (examples/cpp/tvm_greedy): built with cmake against the wheels' tvm-ffi runtime, it loads a TVM
artifact of the bundled model and decodes greedily; its tokens must equal greedy decoding with eager PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'ham-export[tvm]')")


from ham_export.backends import get
from ham_export.core import checkpoint

from .cpp_support import BUNDLED, CAPACITY, PROMPT_IDS, PROMPTS, ROOT, assert_tokens_match_eager, cmake_build, run

SOURCE = ROOT / "examples" / "cpp"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    cmake_build(SOURCE, build)
    return build / "tvm_greedy"


@pytest.fixture(scope="module")
def bundled():
    return checkpoint.load(BUNDLED).model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, bundled) -> Path:
    return get("tvm").build(bundled, tmp_path_factory.mktemp("tvm-cpp"), capacity=CAPACITY, policy="drop")


@pytest.mark.parametrize(("prompt", "overflows"), PROMPTS, ids=PROMPT_IDS)
def test_cpp_tokens_match_eager(program, artifact, bundled, prompt, overflows):
    assert_tokens_match_eager(program, artifact, bundled, prompt, overflows)


def test_cpp_zero_steps_and_bad_arguments(program, artifact, tmp_path):
    result = run(program, artifact, "hi", 0)
    assert result.returncode == 0 and result.stdout.strip() == ""
    for args in [(artifact, "hi"), (artifact, "hi", "x"), (artifact, "", 3), (tmp_path, "hi", 3)]:
        result = run(program, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("tvm_greedy: ")
