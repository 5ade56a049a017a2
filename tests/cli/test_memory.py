"""The memory model against hand-computed bytes, the measured fill, the budget's edge cases and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ham_export.cli import main
from ham_export.errors import InputError
from ham_export.memory import fill as fl
from ham_export.memory import sizes as mem
from ham_export.memory.report import memory_report
from ham_export.memory.units import format_size, parse_size
from tests.conftest import make_small_model, small_config

BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "models" / "tiny-ham.pt"
TEXT = b"The quick brown fox jumps over the lazy dog. " * 40


def test_layer_bytes_by_hand():
    # SMALL: H=2, K=V=8, conv width 4, qkv channels 2 * (8 + 8 + 8) = 48; batch 3, capacity 5, fp16 (2 bytes).
    cfg = small_config()
    b = mem.layer_state_bytes(cfg, batch=3, capacity=5, dtype="fp16")
    assert (b.ssm, b.conv, b.k_cache, b.v_cache, b.score_cache, b.length) == (
        3 * 2 * 8 * 8 * 2, 3 * 3 * 48 * 2, 3 * 2 * 5 * 8 * 2, 3 * 2 * 5 * 8 * 2, 3 * 5 * 2, 3 * 8)
    assert b.fixed == 768 + 864 + 24 and b.cache == 480 + 480 + 30
    # The old per-sequence functions agree with the new per-layer model.
    one = mem.layer_state_bytes(cfg, 1, 1, "fp32")
    assert one.fixed == mem.fixed_state_bytes_per_layer(cfg, "fp32")
    assert one.k_cache + one.v_cache == mem.kv_bytes_per_token_per_layer(cfg, "fp32")


def test_estimate_matches_allocated_state():
    model = make_small_model()
    est = mem.estimate(model.cfg, model.num_parameters(), 2, 7, "fp32", workspace=False)
    state = model.init_state(2, 7)
    allocated = sum(t.numel() * t.element_size() for layer in state for t in layer)
    assert est.state_bytes + est.kv_bytes == allocated
    assert est.weights_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert est.total_bytes == est.weights_bytes + allocated
    assert mem.estimate(model.cfg, 10, 1, 4, "fp32").workspace_bytes > 2 * 4 * (2 * 4 * 16 + 4)


def test_units():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    assert format_size(4 << 20) == "4.00 MiB"
    for bad in ("0", "0MiB", "-1MiB", "12 parsecs", "MiB", "1e400GiB", "9" * 30 + "TiB"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_extrapolation_is_exact_for_power_laws():
    t = torch.arange(1, 257, dtype=torch.float64)
    counts = torch.stack([t, 0.3 * t, 2.0 * t.sqrt(), torch.zeros_like(t)])[None]  # [1, 4, 256]
    predicted = fl.extrapolate_counts(counts, 4096)[0]
    assert torch.allclose(predicted[:3], torch.tensor([4096.0, 0.3 * 4096, 2.0 * 64], dtype=torch.float64))
    assert predicted[3] == 0
    assert fl.extrapolation_check(counts)["max_abs_error"] < 1e-9


def test_fill_is_measured_per_position():
    model = make_small_model()
    docs = fl.documents(TEXT, 64, 4)
    everything, nothing = fl.measure_fill(model, docs, [-1.0, 3.0])
    assert torch.equal(everything.counts[0, 0], torch.arange(1, 65, dtype=torch.float64))
    assert nothing.counts.sum() == 0
    assert fl.predict_fill(everything, 1000).capacity == 1000
    assert fl.predict_fill(nothing, 1000).capacity == 1


def test_chunked_fill_matches_parallel_form():
    """The chunked prefill (growing state) routes exactly as the parallel form; the capacity has the margin."""
    model = make_small_model()
    docs = fl.documents(TEXT, 100, 3)
    tau = 0.2
    (run,) = fl.measure_fill(model, docs, [tau], chunk=16)
    with torch.no_grad():
        logits, routes = model(docs[:, :-1], tau)
    parallel = torch.stack([r.routed.to(torch.float64).cumsum(-1) for r in routes], dim=1)
    assert torch.equal(run.counts, parallel)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), docs[:, 1:].flatten())
    assert run.bits_per_byte == pytest.approx(float(nll) / math.log(2), rel=1e-4)
    prediction = fl.predict_fill(run, 100)
    assert prediction.capacity == min(100, math.ceil(fl.SAFETY * float(run.counts[..., -1].max()) - 1e-9))


def test_policy_quality_overflows_only_with_a_fixed_capacity():
    model = make_small_model()
    docs = fl.documents(TEXT, 64, 2)
    grown = fl.policy_quality(model, docs, -1.0, None, "drop", chunk=16)
    assert grown["overflow_fraction"] == 0 and grown["fill"] == pytest.approx(1.0)
    for policy in ("evict", "drop"):
        small = fl.policy_quality(model, docs, -1.0, 8, policy, chunk=16)
        assert small["fill"] == pytest.approx(1.0) and small["overflow_fraction"] == pytest.approx(1 - 8 / 64)


def test_report_budget_choice_and_edges():
    model = make_small_model()
    floor = mem.estimate(model.cfg, model.num_parameters(), 1, 1, "fp32").total_bytes
    report = memory_report(model, TEXT, 256, thresholds=[-1.0, 3.0], budget=floor + 10, window=64, max_docs=2)
    assert report.budget.best.threshold == 3.0 and report.budget.margin == 10
    assert report.budget.fitting == [3.0]
    assert set(report.policy_comparison) >= {"threshold", "evict", "drop", "evict_cost_bits_per_byte"}
    row = report.to_dict()["rows"][0]
    assert row["capacity"] == 256 and row["kv_fraction"] == pytest.approx(1.0)
    for key in ("threshold", "kv_fraction", "kv_bytes", "state_bytes", "weights_bytes", "total_bytes",
                "bits_per_byte"):
        assert key in row
    with pytest.raises(InputError, match="below the memory of a one-entry cache"):
        memory_report(model, TEXT, 256, thresholds=[3.0], budget=floor - 1, window=64, max_docs=2)


def test_cli_budget_errors_exit_2():
    runner = CliRunner()
    for budget in ("0", "12parsecs", "1KiB"):
        result = runner.invoke(main, ["memory", str(BUNDLED), "--context", "64", "--thresholds", "3",
                                      "--budget", budget, "--window", "32", "--docs", "1"])
        assert result.exit_code == 2, (budget, result.output)
    result = runner.invoke(main, ["memory", str(BUNDLED), "--thresholds", "1", "--sweep"])
    assert result.exit_code == 2


def test_cli_json_and_no_fit_exit_1(tmp_path):
    runner = CliRunner()
    args = ["memory", str(BUNDLED), "--context", "1024", "--thresholds", "0,0.5", "--window", "64", "--docs", "2",
            "--json"]
    result = runner.invoke(main, [*args, "--budget", "3.6MiB"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == "error: no threshold fits the budget of 3.60 MiB", result.stderr
    data = json.loads(result.stdout)
    assert data["budget"]["fits"] is False and data["budget"]["capacity"] >= 1
    assert [r["fits"] for r in data["rows"]] == [False, False]
    result = runner.invoke(main, [*args, "--budget", "1GiB"])
    assert result.exit_code == 0
    assert json.loads(result.output)["budget"]["threshold"] == 0.0


def test_verification_allows_only_the_runtime_fixed_allocations():
    """Within 5%, or above the prediction by at most ONNX Runtime's fixed step allocations; never below it by more
    than 5%, nor above it by more than the allowance."""
    from ham_export.memory.verify import RUNTIME_ALLOWANCE_BYTES, agrees

    mib = 1 << 20
    assert agrees(100 * mib, 104 * mib) and agrees(100 * mib, 96 * mib)
    assert not agrees(100 * mib, 90 * mib) and not agrees(100 * mib, 110 * mib)
    small = 350 * 1024
    assert agrees(small, small + RUNTIME_ALLOWANCE_BYTES) and not agrees(small, small + RUNTIME_ALLOWANCE_BYTES + 1)
    assert not agrees(small + 100 * 1024, small)  # an overestimate gets no allowance


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_small_artifact_reports_the_runtime_overhead_apart(tmp_path):
    """At capacity 64 the runtime's fixed allocations are most of a decode step's peak: the row passes and says how
    much was not modelled."""
    from ham_export.backends import get
    from ham_export.core import checkpoint
    from ham_export.memory.verify import RUNTIME_ALLOWANCE_BYTES, verify_ort
    from ham_export.ops.libraries import ORT

    if not ORT.path().is_file():
        pytest.skip("the ONNX Runtime op library is not built (bash scripts/build-ort-ops.sh)")
    model = checkpoint.load(BUNDLED).model
    artifact = get("onnxruntime").build(model, tmp_path / "ort", capacity=64, policy="drop", ops="custom")
    [row] = verify_ort(artifact, TEXT * 2, 256, [0.5], steps=4)
    assert row["state_bytes"] == row["predicted_state_bytes"]
    assert row["within_tolerance"], row
    assert row["unmodelled_bytes"] == max(0, row["measured_bytes"] - row["predicted_bytes"])
    assert row["unmodelled_bytes"] <= RUNTIME_ALLOWANCE_BYTES


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("ops", ["custom", "standard"])
def test_prediction_matches_ort_decode(tmp_path, ops):
    """The bundled model, exported to ONNX Runtime with a small capacity: predicted vs measured decode memory (both
    forms write the caches in place)."""
    from ham_export.backends import get
    from ham_export.core import checkpoint
    from ham_export.memory.verify import verify_ort
    from ham_export.ops.libraries import ORT

    if ops == "custom" and not ORT.path().is_file():
        pytest.skip("the ONNX Runtime op library is not built (bash scripts/build-ort-ops.sh)")
    model = checkpoint.load(BUNDLED).model
    artifact = get("onnxruntime").build(model, tmp_path / "ort", capacity=2048, policy="drop", ops=ops)
    rows = verify_ort(artifact, TEXT * 2, 512, [0.5], steps=4)
    assert rows[0]["state_bytes"] == rows[0]["predicted_state_bytes"]
    assert abs(rows[0]["relative_difference"]) <= 0.05, rows[0]


RECALL = dict(pairs=4, queries=3, key_len=2, value_len=2, gap=0)


def test_recall_documents_hold_the_task_and_score_exact_values():
    from ham_export.core.data import pydoc_corpus
    from ham_export.train.recall import IGNORE, RecallTask, recall_documents

    task = RecallTask(context=999, **RECALL)  # the context is the window's, not the task's
    docs, targets = recall_documents(task, pydoc_corpus().held_out, 80, 3, seed=5)
    answers = fl.Answers(targets, task.value_len)
    assert docs.shape == (3, 81) and answers.targets.shape == (3, 80)
    asked = answers.targets != IGNORE
    assert int(asked.sum()) == 3 * 3 * 2
    assert torch.equal(answers.targets[asked], docs[:, 1:][asked])  # each answer is the next byte
    oracle = torch.where(asked, answers.targets, 0)
    assert answers.accuracy(oracle) == 1.0
    first_byte_wrong = oracle.clone()
    rows, cols = asked.nonzero(as_tuple=True)
    first_byte_wrong[rows[::2], cols[::2]] += 1  # every value's first byte
    assert answers.accuracy(first_byte_wrong) == 0.0
    again, _ = recall_documents(task, pydoc_corpus().held_out, 80, 3, seed=5)
    assert torch.equal(docs, again)


def test_a_recall_report_chooses_the_most_accurate_threshold_that_fits():
    from ham_export.core.data import pydoc_corpus
    from ham_export.train.recall import RecallTask, recall_documents

    model = make_small_model()
    task = RecallTask(**RECALL)
    docs, targets = recall_documents(task, pydoc_corpus().held_out, 64, 4)
    recall = (docs, fl.Answers(targets, task.value_len), {"name": "recall", "context": 64})
    n = model.num_parameters()
    budget = mem.estimate(model.cfg, n, 1, 200, "fp32").total_bytes  # a cache of 200 entries fits, 256 does not
    report = memory_report(model, pydoc_corpus().held_out, 256, thresholds=[-1.0, 0.5, 3.0], budget=budget, window=64,
                           max_docs=4, recall=recall, fast=False)
    data = report.to_dict()
    assert data["task"]["name"] == "recall" and data["task"]["context"] == 64
    assert all(0.0 <= r["recall_accuracy"] <= 1.0 for r in data["rows"])
    fitting = [r for r in report.rows if r.fits]
    assert report.rows[0].fits is False  # every token cached: 256 entries
    best = max(r.recall_accuracy for r in fitting)
    assert report.budget.best.recall_accuracy == best
    assert "recall_accuracy" in report.policy_comparison["evict"]


def test_cli_memory_task_recall(tmp_path):
    from ham_export.core import checkpoint

    model = make_small_model()
    path = checkpoint.save_pt(model, tmp_path / "m.pt", {"recall": {**RECALL, "context": 64}})
    result = CliRunner().invoke(main, ["memory", str(path), "--task", "recall", "--context", "512", "--window", "96",
                                       "--docs", "3", "--thresholds", "-1,3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == {"name": "recall", **RECALL, "context": 96, "seed": 1234}
    assert [r["threshold"] for r in data["rows"]] == [-1.0, 3.0]
    assert all(r["recall_accuracy"] is not None for r in data["rows"])
    text = CliRunner().invoke(main, ["memory", str(path), "--task", "recall", "--context", "512", "--window", "96",
                                     "--docs", "3", "--thresholds", "-1,3"])
    assert text.exit_code == 0 and "recall" in text.output
    tight = CliRunner().invoke(main, ["memory", str(path), "--task", "recall", "--window", "20", "--docs", "2"])
    assert tight.exit_code == 2 and "recall:" in tight.output  # 7 records of 6 bytes do not fit in 20
