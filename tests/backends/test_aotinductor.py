"""The AOTInductor backend (``ham-export native``) beyond the parity suite: other batch sizes and strided inputs than
the package was compiled from, the manifest of a package of two models, a damaged package, bad options, CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ham_export.backends import ArtifactError, load_runner, registry
from ham_export.backends.aotinductor import AotiRunner
from ham_export.backends.eager import EagerRunner
from ham_export.cli import main

from ..conftest import make_small_model
from .conftest import BUNDLED


@pytest.fixture(scope="module")
def model():
    return make_small_model()


@pytest.fixture(scope="module")
def package(model, tmp_path_factory):
    return registry()["aotinductor"].build(model, tmp_path_factory.mktemp("native") / "model.pt2", capacity=12,
                                            policy="drop")


def test_other_batch_sizes_and_strided_inputs(model, package):
    """The package was compiled from a batch of 2; batches of 1 and 3, and a strided token tensor, must agree."""
    eager = EagerRunner(model, 12, "drop")
    tau = torch.tensor(model.cfg.thresholds)
    with load_runner(package) as runner:
        assert isinstance(runner, AotiRunner)
        for batch in (1, 3):
            tokens = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(batch))
            want, want_state = eager.prefill(tokens, tau)
            got, state = runner.prefill(tokens, tau)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
            token = torch.randint(0, 256, (batch, 3))[:, 1]  # a view with stride 3
            assert not token.is_contiguous() or batch == 1
            want, _ = eager.step(token, tau, want_state)
            got, _ = runner.step(token, tau, state)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)


def test_manifest_names_both_models_of_one_package(package):
    manifest = json.loads((package.parent / "ham_export.json").read_text())
    assert manifest["backend"] == "aotinductor" and manifest["device"] == "cpu"
    assert {p["model_name"] for p in manifest["programs"].values()} == {"prefill", "decode"}
    assert {p["file"] for p in manifest["programs"].values()} == {package.name}
    assert manifest["op_library"]["name"] == "libham_torch_ops.so"
    assert manifest["op_library"]["env"] == "HAM_TORCH_OPS_LIB"


def test_damaged_package_is_refused(package, tmp_path):
    broken = tmp_path / "model.pt2"
    broken.write_bytes(package.read_bytes()[:1000])
    (tmp_path / "ham_export.json").write_text((package.parent / "ham_export.json").read_text())
    with pytest.raises(ArtifactError, match="cannot load prefill"), load_runner(broken):
        pass
    result = CliRunner().invoke(main, ["check", str(BUNDLED), str(broken)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "{tmp}/model.onnx"], "is a .pt2 file"),
    (["-o", "{tmp}/model.pt2", "--max-cache", "0"], "Invalid value"),
    (["-o", "{tmp}/model.pt2", "--device", "tpu"], "Invalid value"),
])
def test_cli_refuses_bad_options(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, ["native", str(BUNDLED), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_package_needs_a_gpu(tmp_path):
    result = CliRunner().invoke(main, ["native", str(BUNDLED), "-o", str(tmp_path / "m.pt2"), "--device", "cuda"])
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output
