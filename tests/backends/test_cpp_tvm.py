"""The C++ runner (examples/cpp/tvm_greedy): built with cmake against the wheels' tvm-ffi runtime, it loads a TVM
artifact of the bundled model and decodes greedily; its tokens must equal greedy decoding with eager PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'ham-export[tvm]')")


from ham_export.backends import get

from .cpp_support import CAPACITY, PROMPT_IDS, PROMPTS, ROOT, assert_tokens_match_eager, cmake_build, run

SOURCE = ROOT / "examples" / "cpp"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    cmake_build(SOURCE, build)
    return build / "tvm_greedy"


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


@pytest.mark.parametrize("lie", ["capacity", "consistent-capacity"])
def test_cpp_manifest_is_checked_against_the_libraries(program, artifact, tmp_path, lie):
    """A manifest whose capacity disagrees with its own program listing, or with the compiled libraries' outputs,
    is refused with exit 2."""
    import json
    import shutil

    from .test_cpp_aoti import _resize

    folder = tmp_path / "lie"
    shutil.copytree(artifact, folder)
    data = json.loads((folder / "ham_export.json").read_text())
    data["capacity"] *= 2
    if lie == "consistent-capacity":
        _resize(data, "capacity", data["capacity"])
    (folder / "ham_export.json").write_text(json.dumps(data))
    result = run(program, folder, "hi", 3)
    assert result.returncode == 2, (result.stdout, result.stderr)
    needle = "does not agree with capacity" if lie == "capacity" else "caches of another capacity"
    assert result.stderr.startswith("tvm_greedy: ") and needle in result.stderr, result.stderr
