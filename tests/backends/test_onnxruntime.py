"""The ONNX Runtime backend beyond the parity suite: the manifest names every graph input and output, a missing op
library is a clear error, float16 exports check against float32 eager, the standard form is opset 27 with default-
domain nodes only and runs in a plain session, and decode with the custom or the standard ops under drop writes the
caches in place (no copy)."""

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


@pytest.mark.parametrize(("ops", "opset", "expected"), [
    ("standard", 27, {"prefill": {"LinearAttention", "Attention"}, "decode": {"TensorScatter"}}),
    ("portable", 18, {"prefill": {"Scan"}, "decode": set()}),
])
def test_standard_forms_need_no_op_library(small, tmp_path, ops, opset, expected):
    folder = export_onnx(small, tmp_path / "art", 24, ops=ops)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["op_library"] is None and manifest["ops"] == ops and manifest["opset"] == opset
    for name, wanted in expected.items():
        model = onnx.load(folder / f"{name}.onnx")
        assert {e.domain: e.version for e in model.opset_import} == {"": opset}
        types = {n.op_type for n in model.graph.node}
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), types
        assert wanted <= types, (name, sorted(types))
        if ops == "standard":
            assert not {"Scan", "Loop"} & types, (name, sorted(types))
    # A plain session, no op library: a prompt, then one step from its state.
    import numpy as np
    import onnxruntime as ort

    prefill, decode = (ort.InferenceSession(str(folder / f"{n}.onnx"), providers=["CPUExecutionProvider"])
                       for n in ("prefill", "decode"))
    thresholds = np.asarray(small.cfg.thresholds, dtype=np.float32)
    outputs = prefill.run(None, {"tokens": np.array([[5, 6, 7]]), "thresholds": thresholds})
    feeds = {"token": np.array([8]), "thresholds": thresholds}
    feeds.update({i.name: x for i, x in zip(decode.get_inputs()[2:], outputs[4:], strict=True)})
    logits = decode.run(None, feeds)[0]
    with torch.no_grad():
        _, state, _ = small.prefill(torch.tensor([[5, 6, 7]]), small.init_state(1, 24), policy="drop")
        want, _, _ = small.step(torch.tensor([8]), state, policy="drop")
    torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-4, rtol=1e-4)


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


COPY_LOG = "in-place optimization not activated"


@pytest.mark.parametrize("share", [True, False])
def test_standard_decode_updates_the_caches_in_place(small, tmp_path, capfd, share):
    """Standard ops under drop: TensorScatter writes into the bound caches, and ONNX Runtime says so by not logging
    its copy warning (shown present when the runner does not share the buffers)."""
    import onnxruntime as ort

    folder = export_onnx(small, tmp_path / "art", 24, ops="standard")
    runner = OrtRunner(load_runner(folder).manifest, share_buffers=share)
    with runner:
        assert runner.share_buffers == share
        options = ort.SessionOptions()
        options.log_severity_level = 1  # warnings: the copy warning is one
        runner.sessions["decode"] = ort.InferenceSession(str(folder / "decode.onnx"), options,
                                                         providers=["CPUExecutionProvider"])
        tau = torch.tensor(-1.0)
        _, state = runner.prefill(torch.tensor([[1, 2, 3]]), tau)
        before = [t.clone() for t in state]
        pointers = [t.data_ptr() for t in state[2:5]]
        capfd.readouterr()
        _, new = runner.step(torch.tensor([4]), tau, state)
        log = capfd.readouterr().err
    assert (COPY_LOG in log) != share, log
    assert int(new[5]) == 4 and ([t.data_ptr() for t in new[2:5]] == pointers) == share
    for layer in range(small.cfg.n_layers):  # slots 0-2 kept, slot 3 the new token's key
        k_new, k_old = new[6 * layer + 2], before[6 * layer + 2]
        torch.testing.assert_close(k_new[:, :, :3], k_old[:, :, :3], atol=0, rtol=0)
        assert not torch.equal(k_new[:, :, 3], k_old[:, :, 3])


def test_missing_op_library_is_a_clear_error(small, tmp_path, monkeypatch):
    folder = export_onnx(small, tmp_path / "art", 8, "drop", "custom")
    monkeypatch.setenv("HAM_ORT_OPS_LIB", str(tmp_path / "nowhere" / "libham_ort_ops.so"))
    with pytest.raises(libraries.OpLibraryError, match="op library not found"):
        load_runner(folder).open()
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder)
    assert code == 2 and "build-ort-ops.sh" in output and "Traceback" not in output


@pytest.mark.parametrize("ops", [pytest.param("custom", marks=needs_library), "standard", "portable"])
def test_fp16_export_checks_against_fp32_eager(small, tmp_path, ops):
    folder = export_onnx(small, tmp_path / "art", 32, "drop", ops, "fp16")
    ckpt = checkpoint.save_pt(small, tmp_path / "m.pt")
    code, output = run("check", ckpt, folder, "--steps", 6, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["atol"] == 3e-2 and 0 < report["max_abs_err"] < 3e-2
    assert json.loads((folder / MANIFEST).read_text())["dtype"] == "fp16"


@pytest.mark.parametrize("ops", ["standard", "portable"])
def test_cli_writes_the_standard_forms(tmp_path, ops):
    code, output = run("onnx", BUNDLED, "-o", tmp_path / ops, "--ops", ops, "--max-cache", 16)
    assert code == 0 and f"onnxruntime artifact, ops {ops}, dtype fp32, capacity 16, policy drop" in output
    assert (tmp_path / ops / "prefill.onnx").is_file() and (tmp_path / ops / "decode.onnx").is_file()


def test_a_manifest_from_before_the_opset_27_form_reads_as_portable(small, tmp_path):
    """A manifest that says ``standard`` with no opset was written when that name meant the opset-18 form."""
    folder = export_onnx(small, tmp_path / "art", 8, ops="portable")
    data = json.loads((folder / MANIFEST).read_text())
    data["ops"] = "standard"
    del data["opset"]
    (folder / MANIFEST).write_text(json.dumps(data))
    with load_runner(folder) as runner:
        assert not runner.share_buffers
