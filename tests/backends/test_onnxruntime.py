"""The ONNX Runtime backend beyond the parity suite: the manifest names every graph input and output, a missing op
library is a clear error, float16 exports check against float32 eager, and decode with the custom ops under drop
writes the caches in place (no copy)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from ham_export.backends import MANIFEST, load_runner, registry
from ham_export.backends.onnxruntime import OrtRunner
from ham_export.cli import main
from ham_export.core import checkpoint
from ham_export.ops import libraries
from ham_export.ops.libraries import ORT

from ..conftest import make_small_model
from .conftest import BUNDLED

needs_library = pytest.mark.skipif(not ORT.path().is_file(),
                                   reason=f"the ONNX Runtime op library is not built at {ORT.path()} ({ORT.build})")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def export_onnx(model, out, capacity, policy="drop", ops="custom", dtype="fp32"):
    return registry()["onnxruntime"].build(model, out, capacity=capacity, policy=policy, ops=ops, dtype=dtype)


@pytest.fixture(scope="module")
def small():
    return make_small_model()


@needs_library
def test_manifest_names_every_graph_input_and_output(small, tmp_path):
    folder = export_onnx(small, tmp_path / "art", 24)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["op_library"]["domain"] == "ham.ai" and manifest["capacity"] == 24
    types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}
    for name in ("prefill", "decode"):
        graph = onnx.load(folder / f"{name}.onnx").graph
        for kind, values in (("inputs", graph.input), ("outputs", graph.output)):
            listed = manifest["programs"][name][kind]
            assert [v.name for v in values] == [row["name"] for row in listed]
            for value, row in zip(values, listed, strict=True):
                assert types[value.type.tensor_type.elem_type] == row["dtype"]
                dims = [d.dim_value if d.HasField("dim_value") else "?" for d in value.type.tensor_type.shape.dim]
                assert len(dims) == len(row["shape"])
                assert all(d == "?" or d == s for d, s in zip(dims, row["shape"], strict=True)), (value.name, dims)
    nodes = {n.op_type for n in onnx.load(folder / "decode.onnx").graph.node if n.domain == "ham.ai"}
    assert nodes == {"CacheAttention", "CacheAppend"}


def test_standard_form_needs_no_op_library(small, tmp_path):
    folder = export_onnx(small, tmp_path / "art", 24, ops="standard")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["op_library"] is None and manifest["ops"] == "standard"
    graph = onnx.load(folder / "prefill.onnx")
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)


@needs_library
def test_decode_writes_the_caches_in_place(small, tmp_path):
    """Custom ops under drop: each cache is bound as input and output; a step copies none of them."""
    with load_runner(export_onnx(small, tmp_path / "art", 24)) as runner:
        assert isinstance(runner, OrtRunner) and runner.share_buffers
        tau = torch.tensor(-1.0)
        _, state = runner.prefill(torch.tensor([[1, 2, 3]]), tau)
        pointers = [t.data_ptr() for t in state[2:5]]
        libraries.reset_cache_copy_stats()
        _, state = runner.step(torch.tensor([4]), tau, state)
        assert libraries.cache_copy_stats() == (0, 0)
        assert [t.data_ptr() for t in state[2:5]] == pointers and int(state[5]) == 4


def test_missing_op_library_is_a_clear_error(small, tmp_path, monkeypatch):
    folder = export_onnx(small, tmp_path / "art", 8, "drop", "custom")
    monkeypatch.setenv("HAM_ORT_OPS_LIB", str(tmp_path / "nowhere" / "libham_ort_ops.so"))
    with pytest.raises(libraries.OpLibraryError, match="op library not found"):
        load_runner(folder).open()
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder)
    assert code == 2 and "build-ort-ops.sh" in output and "Traceback" not in output


@pytest.mark.parametrize("ops", [pytest.param("custom", marks=needs_library), "standard"])
def test_fp16_export_checks_against_fp32_eager(small, tmp_path, ops):
    folder = export_onnx(small, tmp_path / "art", 32, "drop", ops, "fp16")
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder, "--steps", 6, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["atol"] == 3e-2 and 0 < report["max_abs_err"] < 3e-2
    assert json.loads((folder / MANIFEST).read_text())["dtype"] == "fp16"


def test_cli_writes_both_forms(tmp_path):
    code, output = run("onnx", BUNDLED, "-o", tmp_path / "std", "--ops", "standard", "--max-cache", 16)
    assert code == 0 and "onnxruntime artifact, ops standard, dtype fp32, capacity 16, policy drop" in output
    assert (tmp_path / "std" / "prefill.onnx").is_file() and (tmp_path / "std" / "decode.onnx").is_file()
