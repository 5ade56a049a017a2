"""The C++ runner of AOTInductor packages (examples/cpp/aoti_greedy): built with cmake against the torch wheel's
libtorch, together with the op library (runtimes/libtorch), it loads a native package of the bundled model and
decodes greedily; its tokens must equal greedy decoding with eager PyTorch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ham_export.backends import get

from .cpp_support import CAPACITY, PROMPT_IDS, PROMPTS, ROOT, assert_tokens_match_eager, cmake_build, run

SOURCE = ROOT / "examples" / "cpp" / "aoti"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("aoti-build")
    cmake_build(SOURCE, build)
    assert (build / "libham_torch_ops.so").is_file()  # next to the program, where it looks first
    return build / "aoti_greedy"


@pytest.fixture(scope="module")
def package(tmp_path_factory, bundled) -> Path:
    return get("aotinductor").build(bundled, tmp_path_factory.mktemp("native") / "model.pt2", capacity=CAPACITY,
                                    policy="drop")


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("aoti_greedy: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize(("prompt", "overflows"), PROMPTS, ids=PROMPT_IDS)
def test_cpp_tokens_match_eager(program, package, bundled, prompt, overflows):
    assert_tokens_match_eager(program, package, bundled, prompt, overflows)


def test_cpp_package_folder_and_zero_steps(program, package):
    result = run(program, package.parent, "hi", 0)  # the folder holding model.pt2 works as well
    assert result.returncode == 0 and result.stdout.strip() == "", result.stderr


def test_cpp_bad_arguments(program, package, tmp_path):
    for args in [(package, "hi"), (package, "hi", "x"), (package, "hi", -1), (package, "", 3), ("--ops",),
                 (tmp_path, "hi", 3), (tmp_path / "model.pt2", "hi", 3), (package, "hi", " 3"), (package, "hi", "+3"),
                 (package, "hi", "99999999999999999999999"), (package, "hi", 65537)]:
        assert_usage_error(run(program, *args))


@pytest.mark.parametrize(("thresholds", "needle"), [
    ([0.5], "holds 1 values; the model has"),
    (["x", 0.5, 0.5, 0.5], "bad threshold"),
    (["NaN", 0.5, 0.5, 0.5], "is not JSON"),
    ("0.5", "must be an array"),
])
def test_cpp_bad_manifest_thresholds(program, package, tmp_path, thresholds, needle):
    """The compiled programs read one threshold per layer: a manifest with fewer, non-finite ones or no array is
    refused before anything runs (a shorter tensor would be read past its end)."""
    import json

    data = json.loads((package.parent / "ham_export.json").read_text())
    data["thresholds"] = thresholds
    text = json.dumps(data).replace('"NaN"', "NaN")
    shutil.copy(package, tmp_path / "model.pt2")
    (tmp_path / "ham_export.json").write_text(text)
    assert_usage_error(run(program, tmp_path / "model.pt2", "hi", 3), needle)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(package, lone / "model.pt2")  # no manifest beside it
    assert_usage_error(run(program, lone / "model.pt2", "hi", 3), "ham_export.json")


def _resize(data, key: str, value: int) -> None:
    """Make the manifest's listed programs agree with a changed capacity or vocabulary (a consistent lie)."""
    for program in data["programs"].values():
        for t in program["outputs"] + program["inputs"]:
            if key == "capacity" and t["name"].endswith(("k_cache", "v_cache")):
                t["shape"][2] = value
            if key == "capacity" and t["name"].endswith("score_cache"):
                t["shape"][1] = value
            if key == "vocab_size" and t["name"] == "logits":
                t["shape"][-1] = value


MANIFEST_LIES = [
    ("capacity-lie", lambda d: d.update(capacity=2 * d["capacity"]), "does not agree with capacity"),
    ("capacity-string", lambda d: d.update(capacity=str(d["capacity"])), "\"capacity\" must be a whole number"),
    ("format-version-true", lambda d: d.update(format_version=True), "\"format_version\" must be a whole number"),
    ("layers-lie", lambda d: d["model"].update(n_layers=3), "holds 4 values; the model has 3 layers"),
    ("consistent-capacity-lie", lambda d: (d.update(capacity=2 * d["capacity"]), _resize(d, "capacity",
                                                                                      d["capacity"])),
     "is not the one"),
    ("vocabulary", lambda d: (d["model"].update(vocab_size=100), _resize(d, "vocab_size", 100)),
     "PROMPT byte 104 is outside the model's vocabulary of 100"),
    ("another-backend", lambda d: d.update(backend="tvm"), "describes a 'tvm' artifact"),
]


@pytest.mark.parametrize(("edit", "needle"), [pytest.param(*c[1:], id=c[0]) for c in MANIFEST_LIES])
def test_cpp_manifest_is_checked_against_the_package(program, package, tmp_path, edit, needle):
    """The manifest is read with a JSON library and checked (types, counts, shapes that agree with the capacity and
    the vocabulary), and the signature compiled into the package must be the one it lists: else exit 2."""
    import json

    data = json.loads((package.parent / "ham_export.json").read_text())
    edit(data)
    shutil.copy(package, tmp_path / "model.pt2")
    (tmp_path / "ham_export.json").write_text(json.dumps(data))
    assert_usage_error(run(program, tmp_path / "model.pt2", "hi", 3), needle)


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
