"""The C++ ONNX Runtime app (examples/cpp/ort_greedy): built with cmake against ONNX Runtime's headers and the
onnxruntime wheel's library, it decodes the bundled model greedily from the custom-op (with the op library) and the
opset-27 artifacts; its tokens must equal eager greedy decoding, and the bytes it holds the memory model's
prediction. Bad input is exit 2 with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ham_export.backends import get
from ham_export.memory import sizes
from ham_export.ops.libraries import ORT

from .cpp_support import CAPACITY, PROMPT_IDS, PROMPTS, ROOT, assert_tokens_match_eager, cmake_build, run
from .test_cpp_aoti import _resize

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'ham-export[onnx]')")

SOURCE = ROOT / "examples" / "cpp" / "ort"
HEADERS = ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime" / "onnxruntime_cxx_api.h"
FORMS = ["custom", "standard"]


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    if not HEADERS.is_file():
        pytest.skip(f"ONNX Runtime's C++ headers are not fetched at {HEADERS} (bash scripts/build-ort-ops.sh)")
    if not ORT.path().is_file():
        pytest.skip(f"the ONNX Runtime op library is not built at {ORT.path()} (bash scripts/build-ort-ops.sh)")
    build = tmp_path_factory.mktemp("ort-app")
    cmake_build(SOURCE, build)
    return build / "ort_greedy"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, bundled) -> dict[str, Path]:
    return {ops: get("onnxruntime").build(bundled, tmp_path_factory.mktemp(f"ort-{ops}"), capacity=CAPACITY,
                                          policy="drop", ops=ops) for ops in FORMS}


def ops_args(ops: str) -> tuple:
    return ("--ops", ORT.path()) if ops == "custom" else ()


@pytest.mark.parametrize("ops", FORMS)
@pytest.mark.parametrize(("prompt", "overflows"), PROMPTS, ids=PROMPT_IDS)
def test_cpp_tokens_match_eager_and_bytes_match_the_memory_model(program, artifacts, bundled, ops, prompt,
                                                                 overflows):
    result = assert_tokens_match_eager(program, artifacts[ops], bundled, prompt, overflows, ops_args(ops))
    stats = result.stdout.splitlines()[1]
    predicted = sizes.estimate(bundled.cfg, 0, 1, CAPACITY, "fp32", workspace=False)
    assert stats.startswith("# decode ") and stats.endswith(f"; state {predicted.state_bytes + predicted.kv_bytes} "
                                                            "bytes"), stats
    # A full cache is said once, with the policy that applied; nothing is said otherwise.
    full = [line for line in result.stderr.splitlines() if "found no room" in line]
    assert len(full) == (1 if overflows else 0) and all("(policy drop: not stored)" in line for line in full)


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("ort_greedy: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def lying_copy(artifact: Path, folder: Path, edit=None, swap: bool = False) -> Path:
    shutil.copytree(artifact, folder)
    if edit is not None:
        data = json.loads((folder / "ham_export.json").read_text())
        edit(data)
        (folder / "ham_export.json").write_text(json.dumps(data))
    if swap:
        shutil.copy(folder / "prefill.onnx", folder / "decode.onnx")
    return folder


def test_cpp_bad_input_is_one_line(program, artifacts, tmp_path):
    custom, standard = artifacts["custom"], artifacts["standard"]
    assert_usage_error(run(program, "--ops", tmp_path / "none.so", custom, "hi", 3), "op library not found")
    not_elf = tmp_path / "libham_ort_ops.so"
    not_elf.write_text("not a library\n")
    assert_usage_error(run(program, "--ops", not_elf, custom, "hi", 3), "cannot load the op library")
    assert run(program, standard, "hi", 3).returncode == 0  # the opset-27 form needs no op library
    assert_usage_error(run(program, standard, "", 3), "PROMPT")
    assert_usage_error(run(program, standard, "hi", "-1"), "STEPS")
    cases = [
        (dict(edit=lambda d: d.update(backend="tvm")), "describes a 'tvm' artifact"),
        (dict(edit=lambda d: (d["model"].update(vocab_size=100), _resize(d, "vocab_size", 100))),
         "PROMPT byte 104 is outside the model's vocabulary of 100"),
        (dict(edit=lambda d: d.update(capacity=2 * CAPACITY)), "does not agree with capacity"),
        (dict(edit=lambda d: (d.update(capacity=2 * CAPACITY), _resize(d, "capacity", 2 * CAPACITY))),
         "has another shape in the graph"),
        (dict(swap=True), "decode.onnx"),
        (dict(edit=lambda d: d.update(dtype="fp16")), "runs fp32 artifacts"),
        (dict(edit=lambda d: d["programs"]["decode"]["outputs"][0].update(dtype="float16")),
         "logits is float32 in the graph; the manifest says float16"),
    ]
    for i, (how, needle) in enumerate(cases):
        assert_usage_error(run(program, lying_copy(standard, tmp_path / f"case{i}", **how), "hi", 3), needle)
