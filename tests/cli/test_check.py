"""``ham-export check`` and its comparator: every kind of mismatch is caught, a near-threshold flip and an eviction
decided by a near tie are reported apart, a check that compared nothing fails, and the CLI's exit codes (artifacts
from other weights, bad tolerances)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ham_export.backends.base import Output
from ham_export.backends.eager import EagerRunner
from ham_export.check.compare import compare
from ham_export.check.prompts import default_prompts
from ham_export.cli import main
from ham_export.core import checkpoint

from ..conftest import make_small_model


@pytest.fixture(scope="module")
def model():
    return make_small_model()


def prompts():
    return default_prompts()[:, :16]


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


class AtTau(EagerRunner):
    """Flips exactly the decision of token 5 of sequence 0 in layer 0 at the prefill (run it at that token's score:
    a flip any rounding could cause)."""

    def _prefill(self, tokens, thresholds):
        out, state = super()._prefill(tokens, thresholds)
        routed = out.routed.clone()
        routed[0, 0, 5] = ~routed[0, 0, 5]
        return Output(out.logits, out.scores, routed, out.overflow), state


def score_of_token_5(model, tokens) -> float:
    with torch.no_grad():
        out, _ = EagerRunner(model, 64, "drop").prefill(tokens, torch.tensor(-1.0))
    return float(out.scores[0, 0, 5])


def test_near_threshold_flip_is_reported_apart(model):
    eager = EagerRunner(model, 64, "drop")
    tau = score_of_token_5(model, prompts())
    [result] = compare(eager, AtTau(model, 64, "drop"), prompts(), [tau], 2, 1e-4, 1e-4, 1e-4)
    assert result.passed and result.near_flips == 1 and result.diverged_sequences == 1


class SwapsAnEviction(EagerRunner):
    """Evicts as eager does, except that sequence 0's first eviction of a decode step in layer 0 lands in the
    other slot of the two lowest: what another backend's rounding could do at a near tie."""

    @torch.no_grad()
    def _step(self, token, thresholds, state):
        before = state[0].score_cache.clone()
        out, state = super()._step(token, thresholds, state)
        layer = state[0]
        if int(out.overflow[0, 0]) > 0 and not torch.equal(before[0], layer.score_cache[0]):
            changed = int((before[0] != layer.score_cache[0]).nonzero()[0])
            other = int(before[0].argsort()[1]) if changed == int(before[0].argmin()) else int(before[0].argmin())
            for cache in (layer.k_cache, layer.v_cache):
                cache[0, :, [changed, other]] = cache[0, :, [other, changed]]
            layer.score_cache[0, [changed, other]] = layer.score_cache[0, [other, changed]]
        return out, state


def test_an_eviction_near_tie_is_reported_apart(model):
    """The same swapped eviction fails the check where the decision was clear, and is a near tie (sequence 0
    only; the others, whose caches agree, are still compared) where every score lies within the margin of a
    grid line (margin 1: every eviction decision is a near tie)."""
    eager, swapped = EagerRunner(model, 12, "evict"), SwapsAnEviction(model, 12, "evict")
    [clear] = compare(eager, swapped, prompts(), [-1.0], 4, 1e-4, 1e-4, 1e-4)
    assert not clear.passed and clear.near_ties == 0
    assert any("k_cache" in f or "score_cache" in f for f in clear.failures), clear.failures
    [near] = compare(eager, swapped, prompts(), [-1.0], 4, 1e-4, 1e-4, 1.0)
    assert near.passed, near.failures
    assert near.near_ties == 1 and near.diverged_sequences == 1
    assert near.compared_sequences == near.sequences - 1


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


def test_a_check_that_compares_no_sequence_fails(model):
    """Every sequence near-flips at the prefill: nothing was compared, and that is not a pass."""
    eager = EagerRunner(model, 64, "drop")
    tau = score_of_token_5(model, prompts()[:1])
    [result] = compare(eager, AtTau(model, 64, "drop"), prompts()[:1], [tau], 2, 1e-4, 1e-4, 1e-4)
    assert not result.passed and result.compared_sequences == 0 and result.sequences == 1
    assert "no sequence was compared" in result.failures[0]


@pytest.mark.parametrize("option", ["--atol", "--rtol", "--margin"])
def test_non_finite_tolerances_exit_2(tmp_path, option):
    model = make_small_model()
    ckpt = checkpoint.save_pt(model, tmp_path / "m.pt")
    code, _ = run("torch", ckpt, "-o", tmp_path / "art", "--max-cache", 16)
    assert code == 0
    code, output = run("check", ckpt, tmp_path / "art", option, "nan")
    assert code == 2 and "finite" in output and "Traceback" not in output
