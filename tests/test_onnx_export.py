"""The bundled model through ONNX, both op forms, checked against eager; overflow policies; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from ham_export import checkpoint
from ham_export.check import compare, default_prompts
from ham_export.cli import main
from ham_export.export import export_onnx
from ham_export.manifest import MANIFEST, ArtifactError
from ham_export.ort_ops import library_path
from ham_export.runners import EagerRunner, OrtRunner, load_runner

from .conftest import make_small_model

BUNDLED = Path(__file__).parents[1] / "examples" / "models" / "tiny-ham.pt"
needs_library = pytest.mark.skipif(not library_path().is_file(),
                                   reason="the ONNX Runtime op library is not built (bash scripts/build-ort-ops.sh)")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def bundled_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    folders = {}
    for ops in ("custom", "standard"):
        code, output = run("onnx", BUNDLED, "-o", root / ops, "--ops", ops, "--max-cache", 160)
        assert code == 0, output
        folders[ops] = root / ops
    code, output = run("torch", BUNDLED, "-o", root / "torch", "--max-cache", 160)
    assert code == 0, output
    folders["torch"] = root / "torch"
    return folders


@pytest.mark.parametrize("ops", [pytest.param("custom", marks=needs_library), "standard", "torch"])
def test_bundled_model_checks_at_three_thresholds(bundled_artifacts, ops):
    code, output = run("check", BUNDLED, bundled_artifacts[ops], "--steps", 64, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["passed"] and report["max_abs_err"] <= 1e-4
    rows = report["rows"]
    assert [r["kv_fraction"] for r in rows][1:] == [1.0, 0.0]  # -1 caches every token, 3 none
    assert 0.0 < rows[0]["kv_fraction"] < 1.0  # the model's own thresholds cache a fraction
    assert all(r["far_flips"] == 0 and r["steps"] == 64 for r in rows)


@needs_library
def test_manifest_names_every_graph_input_and_output(bundled_artifacts):
    folder = bundled_artifacts["custom"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["op_library"]["domain"] == "ham.ai" and manifest["capacity"] == 160
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
    standard = onnx.load(bundled_artifacts["standard"] / "prefill.onnx")
    assert all(n.domain in ("", "ai.onnx") for n in standard.graph.node)


@pytest.fixture(scope="module")
def small():
    return make_small_model()


@pytest.mark.parametrize("ops, policy", [
    pytest.param("custom", "drop", marks=needs_library),
    pytest.param("custom", "evict", marks=needs_library),
    ("standard", "drop"),
    ("standard", "evict"),
])
def test_overflow_policies_match_eager(small, tmp_path, ops, policy):
    folder = export_onnx(small, tmp_path / "art", 12, policy, ops)  # prompt 16 + 6 steps > 12: the policy applies
    runner = load_runner(folder)
    eager = EagerRunner(small, runner.capacity, runner.policy)
    prompts = default_prompts()[:2, :16]
    with torch.no_grad():
        _, routes = small(prompts)
    mid = float(torch.cat([r.score.flatten() for r in routes]).median())
    results = compare(eager, runner, prompts, [-1.0, mid, 3.0], 6, 1e-4, 1e-4, 1e-4)
    assert all(r.passed for r in results), [r.failures for r in results]
    out, _ = runner.prefill(prompts, torch.tensor(-1.0))
    assert out.overflow.tolist() == [[4, 4]] * small.cfg.n_layers


def test_missing_op_library_is_a_clear_error(small, tmp_path, monkeypatch):
    folder = export_onnx(small, tmp_path / "art", 8, "drop", "custom")
    monkeypatch.setenv("HAM_ORT_OPS_LIB", str(tmp_path / "nowhere" / "libham_ort_ops.so"))
    with pytest.raises(Exception, match="op library not found"):
        load_runner(folder)
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder)
    assert code == 2 and "build-ort-ops.sh" in output and "Traceback" not in output


def test_bad_manifest_and_threshold_exit_2(small, tmp_path):
    folder = export_onnx(small, tmp_path / "art", 8, "drop", "standard")
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder, "--threshold", "nan")
    assert code == 2 and "finite" in output
    manifest = folder / MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 7}))
    with pytest.raises(ArtifactError, match="format version 7"):
        load_runner(folder)
    manifest.write_text(json.dumps({**data, "backend": "tensorrt-9"}))
    code, output = run("check", ckpt, folder)
    assert code == 2 and "unknown backend" in output
    manifest.write_text(json.dumps(data))
    (folder / "decode.onnx").write_bytes((folder / "decode.onnx").read_bytes()[:100])
    code, output = run("check", ckpt, folder)
    assert code == 2 and "Traceback" not in output


def test_runner_rejects_bad_tokens_and_thresholds(small, tmp_path):
    runner = load_runner(export_onnx(small, tmp_path / "art", 8, "drop", "standard"))
    assert isinstance(runner, OrtRunner)
    with pytest.raises(Exception, match="token ids"):
        runner.prefill(torch.tensor([[1, 300]]), torch.tensor(0.5))
    with pytest.raises(Exception, match="finite"):
        runner.prefill(torch.tensor([[1, 2]]), torch.tensor(float("nan")))


@pytest.mark.parametrize("ops", [pytest.param("custom", marks=needs_library), "standard"])
def test_fp16_export_checks_against_fp32_eager(small, tmp_path, ops):
    folder = export_onnx(small, tmp_path / "art", 32, "drop", ops, "fp16")
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder, "--steps", 6, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["atol"] == 3e-2 and 0 < report["max_abs_err"] < 3e-2
    assert json.loads((folder / MANIFEST).read_text())["dtype"] == "fp16"
