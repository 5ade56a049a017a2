"""torch.export programs, artifacts and the comparator: like equals like, and every mismatch is caught."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ham_export import checkpoint
from ham_export.check import compare, default_prompts
from ham_export.cli import main
from ham_export.export import export_torch
from ham_export.manifest import ArtifactError
from ham_export.runners import EagerRunner, Output, load_runner

from .conftest import make_small_model

SETTINGS = [-1.0, 3.0]


@pytest.fixture(scope="module")
def model():
    return make_small_model()


@pytest.fixture(scope="module", params=["drop", "evict"])
def artifact(request, model, tmp_path_factory):
    # Capacity 12 < prompt (16) + steps (8): the policy applies, in eager and in the programs alike.
    return export_torch(model, tmp_path_factory.mktemp(request.param), 12, request.param)


def prompts():
    return default_prompts()[:, :16]


def mid(model):
    with torch.no_grad():
        _, routes = model(prompts())
    return float(torch.cat([r.score.flatten() for r in routes]).median())


def test_exported_programs_equal_eager_under_overflow(model, artifact):
    runner = load_runner(artifact)
    eager = EagerRunner(model, runner.capacity, runner.policy)
    results = compare(eager, runner, prompts(), [*SETTINGS, mid(model)], 8, 1e-5, 1e-5, 1e-4)
    for r in results:
        assert r.passed, r.failures
        assert r.max_abs_err <= 1e-5 and r.far_flips == 0
    assert results[0].kv_fraction == 1.0 and results[1].kv_fraction == 0.0


class Tampered(EagerRunner):
    """An eager runner with one deliberate fault."""

    def __init__(self, model, capacity, policy, fault):
        super().__init__(model, capacity, policy)
        self.fault = fault

    def _tamper(self, out, state):
        if self.fault == "logits":
            out = Output(out.logits + 1e-3, out.scores, out.routed, out.overflow)
        elif self.fault == "route":
            routed = out.routed.clone()
            routed[0, 0, -1] = ~routed[0, 0, -1]
            out = Output(out.logits, out.scores, routed, out.overflow)
        elif self.fault == "cache":
            state = [s._replace(k_cache=s.k_cache + 1e-3) for s in state]
        elif self.fault == "length":
            state = [s._replace(length=s.length + 1) for s in state]
        return out, state

    def _step(self, token, thresholds, state):
        return self._tamper(*super()._step(token, thresholds, state))


@pytest.mark.parametrize("fault", ["logits", "route", "cache", "length"])
def test_comparator_catches_each_kind_of_fault(model, fault):
    eager = EagerRunner(model, 64, "drop")
    bad = Tampered(model, 64, "drop", fault)
    [result] = compare(eager, bad, prompts(), [-1.0], 2, 1e-4, 1e-4, 1e-4)
    assert not result.passed
    if fault == "route":
        assert result.far_flips > 0
    if fault == "length":
        assert result.length_mismatches > 0


def test_near_threshold_flip_is_reported_apart(model):
    eager = EagerRunner(model, 64, "drop")
    with torch.no_grad():
        out, _ = eager.prefill(prompts(), torch.tensor(-1.0))
    tau = float(out.scores[0, 0, 5])  # exactly at one token's score: any rounding may flip it

    class AtTau(EagerRunner):
        """Flips exactly the decision of the token that sits at the threshold."""

        def _prefill(self, tokens, thresholds):
            out, state = super()._prefill(tokens, thresholds)
            routed = out.routed.clone()
            routed[0, 0, 5] = ~routed[0, 0, 5]
            return Output(out.logits, out.scores, routed, out.overflow), state

    [result] = compare(eager, AtTau(model, 64, "drop"), prompts(), [tau], 2, 1e-4, 1e-4, 1e-4)
    assert result.passed and result.near_flips == 1 and result.diverged_sequences == 1


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_torch_export_and_check(tmp_path):
    model = make_small_model()
    ckpt = checkpoint.save_pt(model, tmp_path / "m.pt")
    code, _ = run("torch", ckpt, "-o", tmp_path / "art", "--max-cache", 16)
    assert code == 0
    code, output = run("check", ckpt, tmp_path / "art", "--steps", 4, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["passed"] and report["max_abs_err"] <= 1e-4 and len(report["rows"]) == 3
    # Another model's weights: refused as bad input.
    other = make_small_model()
    with torch.no_grad():
        other.embed.weight.mul_(1.01)
    ckpt_other = checkpoint.save_pt(other, tmp_path / "other.pt")
    code, output = run("check", ckpt_other, tmp_path / "art")
    assert code == 2 and "other weights" in output
    # The same identity but different programs: a real mismatch, exit 1.
    code, _ = run("torch", ckpt_other, "-o", tmp_path / "art_other", "--max-cache", 16)
    manifest = tmp_path / "art_other" / "ham_export.json"
    data = json.loads(manifest.read_text())
    data["model_sha256"] = json.loads((tmp_path / "art" / "ham_export.json").read_text())["model_sha256"]
    manifest.write_text(json.dumps(data))
    code, output = run("check", ckpt, tmp_path / "art_other", "--steps", 2)
    assert code == 1 and "FAIL" in output


def test_broken_artifacts_exit_2(tmp_path, artifact):
    ckpt = checkpoint.save_pt(make_small_model(), tmp_path / "m.pt")
    code, output = run("check", ckpt, tmp_path / "nothing")
    assert code == 2 and "not found" in output
    (tmp_path / "empty").mkdir()
    code, output = run("check", ckpt, tmp_path / "empty")
    assert code == 2 and "ham_export.json is missing" in output
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in artifact.iterdir():
        (cut / f.name).write_bytes(f.read_bytes()[: 200] if f.suffix == ".pt2" else f.read_bytes())
    with pytest.raises(ArtifactError, match="truncated"):
        load_runner(cut)
    code, output = run("check", ckpt, cut)
    assert code == 2 and "Traceback" not in output


def test_greedy_generation_is_the_same_on_eager_and_exported(model, artifact):
    from ham_export.generate import greedy

    runner = load_runner(artifact)
    eager = EagerRunner(model, runner.capacity, runner.policy)
    tokens, outputs = greedy(runner, prompts(), 6, -1.0)
    expected, _ = greedy(eager, prompts(), 6, -1.0)
    assert tokens.shape == (3, 6) and torch.equal(tokens, expected)
    assert len(outputs) == 6 and int(outputs[-1].overflow.sum()) > 0  # capacity 12 < 16 + 6
