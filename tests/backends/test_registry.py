"""The backend registry, the typed manifest and the runner's lifecycle and input checks (run on the torch.export
backend, the cheapest to build; every backend shares this code)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ham_export.backends import MANIFEST, ArtifactError, get, load_runner, read_manifest, registry
from ham_export.backends.eager import EagerRunner
from ham_export.backends.generate import greedy
from ham_export.cli import main
from ham_export.core import checkpoint
from ham_export.errors import InputError

from ..conftest import make_small_model
from .conftest import small_prompts

BACKENDS = {"torch.export": "torch", "onnxruntime": "onnx", "aotinductor": "native", "tvm": "tvm", "triton": "triton",
            "tensorrt": "trt"}


@pytest.fixture(scope="module")
def model():
    return make_small_model()


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    return get("torch.export").build(model, tmp_path_factory.mktemp("torch"), capacity=12, policy="drop")


def test_the_registry_holds_every_backend_and_the_cli_a_command_for_each():
    assert {name: backend.command for name, backend in registry().items()} == BACKENDS
    for backend in registry().values():
        assert backend.command in main.commands
        assert backend.memory, backend.name  # the memory report says something about each
    with pytest.raises(ArtifactError, match=r"unknown backend 'tensorrt-9'; known: torch\.export, onnxruntime"):
        get("tensorrt-9")


def test_manifest_round_trip(artifact):
    manifest = read_manifest(artifact)
    assert (manifest.backend, manifest.capacity, manifest.policy, manifest.dtype) == ("torch.export", 12, "drop",
                                                                                      "fp32")
    assert manifest.directory == artifact and set(manifest.programs) == {"prefill", "decode"}
    assert manifest.programs["decode"].inputs[2].name == "past.0.ssm"
    assert json.loads((artifact / MANIFEST).read_text()) == manifest.to_dict()


@pytest.mark.parametrize(("change", "message"), [
    (dict(format_version=7), "format version 7"),
    (dict(format_version=True), "format version True"),
    (dict(backend="tensorrt-9"), "unknown backend 'tensorrt-9'"),
    (dict(capacity="12"), "field 'capacity' must be an integer, got '12'"),
    (dict(capacity=0), "field 'capacity' must be at least 1, got 0"),
    (dict(capacity=True), "field 'capacity' must be an integer"),
    (dict(policy="keep"), "field 'policy' must be one of drop, evict, got 'keep'"),
    (dict(dtype="int8"), "field 'dtype' must be one of fp32, fp16, got 'int8'"),
    (dict(thresholds=[0.5]), "field 'thresholds' must hold 2 finite numbers"),
    (dict(thresholds=[0.5, math.nan]), "field 'thresholds' must hold 2 finite numbers"),
    (dict(model_sha256=None), "field 'model_sha256' must be a string"),
    (dict(model_sha256="abc"), "field 'model_sha256' must be 64 hex digits"),
    (dict(model={"n_layers": "two"}), "field 'model': config.n_layers must be a positive integer"),
    (dict(ops=3), "field 'ops' must be a string, got int"),
    (dict(colour="blue"), "unknown field 'colour' for a torch.export artifact"),
    (dict(programs={"prefill": {"file": "prefill.pt2"}}), "the manifest names no decode program"),
    (dict(programs={"prefill": {"file": "prefill.pt2"}, "decode": {"file": "nope.pt2"}}), "decode program missing"),
])
def test_a_bad_manifest_names_the_field(artifact, tmp_path, change, message):
    folder = tmp_path / "art"
    folder.mkdir()
    for f in artifact.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data = json.loads((folder / MANIFEST).read_text())
    data.update(change)
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_manifest(folder)


def test_broken_artifacts_exit_2(model, tmp_path, artifact):
    ckpt = checkpoint.save_pt(model, tmp_path / "m.pt")

    def check(folder):
        result = CliRunner().invoke(main, ["check", str(ckpt), str(folder)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        return result.output

    assert "not found" in check(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert "ham_export.json is missing" in check(tmp_path / "empty")
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / MANIFEST).write_text("{")
    assert "not valid JSON" in check(tmp_path / "bad-json")
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in artifact.iterdir():
        (cut / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".pt2" else f.read_bytes())
    with pytest.raises(ArtifactError, match="truncated"):
        load_runner(cut).open()
    assert "truncated" in check(cut)


def test_a_runner_runs_only_while_open(artifact):
    runner = load_runner(artifact)
    assert not runner.is_open
    with pytest.raises(InputError, match="not open"):
        runner.prefill(torch.tensor([[1, 2]]), 0.5)
    with runner as opened:
        assert opened is runner and runner.is_open
        runner.prefill(torch.tensor([[1, 2]]), 0.5)
    assert not runner.is_open
    runner.open()
    runner.open()  # idempotent
    runner.prefill(torch.tensor([[1, 2]]), 0.5)
    runner.close()


@pytest.mark.parametrize(("tokens", "thresholds", "message"), [
    (torch.tensor([[1, 300]]), 0.5, r"token ids must be in \[0, 256\)"),
    (torch.tensor([[-1, 2]]), 0.5, r"token ids must be in \[0, 256\)"),
    (torch.tensor([[]], dtype=torch.int64), 0.5, "non-empty integer tensor"),
    (torch.tensor([[1.0, 2.0]]), 0.5, "non-empty integer tensor"),
    (torch.tensor([1, 2]), 0.5, "with 2 dims"),
    (torch.tensor([[1, 2]]), float("nan"), "finite"),
    (torch.tensor([[1, 2]]), [0.1, 0.2, 0.3], "got 3 thresholds for a model with 2 layers"),
])
def test_runner_rejects_bad_tokens_and_thresholds(artifact, tokens, thresholds, message):
    with load_runner(artifact) as runner, pytest.raises(InputError, match=message):
        runner.prefill(tokens, thresholds)


def test_a_refused_cache_length_is_an_error_at_the_runner(model, tmp_path):
    """A state whose length lies outside [0, C]: the kernels refuse it (the reference on the host; a device kernel
    by flagging the row), and the runner says so."""
    from ham_export.backends.programs import flatten_state

    state = flatten_state(model.init_state(2, 12))
    state[5] = torch.tensor([3, 13])
    with load_runner(get("torch.export").build(model, tmp_path / "a", capacity=12, policy="drop")) as runner, \
            pytest.raises(InputError, match=r"input 'length' holds 13 at batch 1, outside \[0, C\] with C = 12"):
        runner.step(torch.tensor([1, 2]), 0.5, state)


def test_greedy_generation_is_the_same_on_eager_and_an_artifact(model, tmp_path):
    artifact = get("torch.export").build(model, tmp_path / "evict", capacity=12, policy="evict")
    with load_runner(artifact) as runner:
        tokens, outputs = greedy(runner, small_prompts(), 6, -1.0)
        expected, _ = greedy(EagerRunner(model, runner.capacity, runner.policy), small_prompts(), 6, -1.0)
    assert tokens.shape == (3, 6) and torch.equal(tokens, expected)
    assert len(outputs) == 6 and int(outputs[-1].overflow.sum()) > 0  # capacity 12 < 16 + 6
