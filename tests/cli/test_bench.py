"""``ham-export bench``: rows for every artifact x fill x batch, caches filled as asked (capped at capacity), ratios
against the first row, floors where an empty-cache row exists, prefill rows, JSON; bad options are exit 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from ham_export.backends import registry
from ham_export.bench import filled_state, open_runner, own_fractions, parse_fill
from ham_export.cli import main
from ham_export.core import checkpoint
from ham_export.errors import InputError

from ..conftest import make_small_model

CAPACITY = 48


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = make_small_model()
    return {
        "model": checkpoint.save_pt(model, root / "model.pt"),
        "onnx": registry()["onnxruntime"].build(model, root / "onnx", capacity=CAPACITY, policy="drop",
                                               ops="standard"),
        "exported": registry()["torch.export"].build(model, root / "exported", capacity=CAPACITY, policy="drop"),
        "root": root,
    }


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_fills_are_thresholds_or_fractions():
    assert parse_fill("-1").fraction == 1.0 and parse_fill("3").fraction == 0.0
    assert parse_fill("0.25").fraction == 0.25 and parse_fill("0.25").threshold is None
    assert parse_fill("own").fraction is None  # resolved per artifact
    for bad in ("1.5", "x", "nan"):
        with pytest.raises(InputError):
            parse_fill(bad)


def test_own_fill_is_known_without_text_where_the_thresholds_say_so():
    def runner(thresholds):
        return SimpleNamespace(manifest=SimpleNamespace(thresholds=thresholds, directory="art"))

    assert own_fractions(runner([-1.0, -1.0]), None) == [1.0, 1.0]  # a full-cache model
    assert own_fractions(runner([3.0, 3.0]), None) == [0.0, 0.0]  # pure GDN
    assert own_fractions(runner([-1.0, 0.5]), lambda r: [0.7, 0.25]) == [1.0, 0.25]
    with pytest.raises(InputError, match="give --model"):
        own_fractions(runner([0.5, 0.5]), None)


@pytest.mark.parametrize("artifact", ["onnx", "model"])
def test_a_filled_state_decodes_from_its_length(world, artifact):
    with open_runner(world[artifact], 64) as runner:
        state = filled_state(runner, 2, 20)
        _, state = runner.step(torch.tensor([101, 102]), -1.0, state)
        lengths = runner.state_tensors(state)[5::6]
        assert all(x.tolist() == [21, 21] for x in lengths)


def test_bench_rows_ratios_floors_and_json(world):
    out = world["root"] / "bench.json"
    code, output = run("bench", world["onnx"], world["exported"], "--context", 64, "--fill", -1, "--fill", 0.5,
                       "--fill", 3, "--iterations", 4, "--repeats", 2, "--warmup", 1, "--prompt", 16, "--json", out,
                       "--plot", world["root"] / "bench.png")
    assert code == 0, output
    assert (world["root"] / "bench.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    rows = report["decode"]
    assert [(r["backend"], r["fill"]) for r in rows] == [(b, f) for b in ("onnxruntime", "torch.export")
                                                         for f in ("-1", "0.5", "3")]
    assert [r["entries"] for r in rows] == [CAPACITY, 32, 0] * 2  # -1 fills 64, capped at the capacity
    assert rows[0]["ratio"] == 1.0 and all(r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] for r in rows)
    assert all(r["of_floor"] is not None and r["floor_ms"] > 0 for r in rows)
    assert rows[2]["of_floor"] == pytest.approx(1.0)  # the empty-cache row is its own floor
    assert all(r["read_bytes"] == 0 for r in rows if r["entries"] == 0)
    assert all(r["command"].startswith("ham-export bench ") and "--fill" in r["command"] for r in rows)
    assert len(report["prefill"]) == 2 and report["prefill"][0]["ratio"] == 1.0
    assert report["bandwidth_bytes_per_s"] > 1e8 and report["peak_rss_bytes"] > 0
    assert "ham-export bench" in output and "decode at context 64" in output
    # the flat rows: one per decode row, the keys, figures taken from the same rows
    flat = report["rows"]
    assert len(flat) == len(rows)
    for row, decode in zip(flat, rows, strict=True):
        assert {"backend", "threshold", "kv_fraction", "context", "batch", "decode_ms_p50", "decode_ms_p90",
                "decode_ms_p99", "prefill_tokens_per_s", "kv_bytes", "total_bytes"} <= set(row)
        assert (row["decode_ms_p50"], row["decode_ms_p90"], row["decode_ms_p99"]) == (
            decode["median_ms"], decode["p90_ms"], decode["p99_ms"])
        assert row["ratio"] == pytest.approx(row["decode_ms_p50"] / flat[0]["decode_ms_p50"])
        assert (row["context"], row["batch"], row["kv_fraction"]) == (64, 1, decode["fraction"])
        prefill = next(r for r in report["prefill"] if r["artifact"] == row["artifact"])
        assert row["prefill_tokens_per_s"] == prefill["tokens_per_s"]
        # the caches at capacity: both layers' keys, values and scores; the total adds weights, state, workspace
        cfg = make_small_model().cfg
        assert row["kv_bytes"] == cfg.n_layers * CAPACITY * (cfg.n_heads * (cfg.head_dim + cfg.head_dim_v) + 1) * 4
        assert row["total_bytes"] > row["kv_bytes"] + 4 * make_small_model().num_parameters()
    assert [r["threshold"] for r in flat[:3]] == [-1.0, list(checkpoint.load(world["model"]).config.thresholds),
                                                   3.0]


def test_bench_own_fill_is_measured_with_the_checkpoint(world):
    code, output = run("bench", world["onnx"], "--context", 64, "--fill", "own", "--model", world["model"],
                       "--iterations", 2, "--repeats", 1, "--warmup", 0, "--prompt", 8, "--json", "-")
    assert code == 0, output
    [row] = json.loads(output)["decode"]
    assert row["fill"] == "own" and 0.0 <= row["fraction"] <= 1.0
    assert all(0 <= e <= CAPACITY for e in row["entries_per_layer"]) and len(row["entries_per_layer"]) == 2
    other = make_small_model()
    other.reset_parameters(seed=7)
    code, output = run("bench", world["onnx"], "--context", 64, "--fill", "own", "--model",
                       checkpoint.save_pt(other, world["root"] / "other.pt"), "--iterations", 1, "--repeats", 1,
                       "--prompt", 8)
    assert code == 2 and "other weights" in output, output


def test_a_checkpoint_benches_as_the_eager_baseline(world):
    """The eager model (a checkpoint among the artifacts) gets a cache for the whole context and is the ratios' base;
    its state is prepared as an artifact's is."""
    code, output = run("bench", world["model"], world["onnx"], "--context", 64, "--fill", -1, "--iterations", 2,
                       "--repeats", 1, "--warmup", 1, "--prompt", 8, "--json", "-")
    assert code == 0, output
    report = json.loads(output)
    eager, onnx = report["decode"]
    assert (eager["backend"], eager["entries"], onnx["entries"]) == ("eager", 64, CAPACITY)
    assert onnx["ratio"] == pytest.approx(onnx["median_ms"] / eager["median_ms"])
    assert [r["backend"] for r in report["prefill"]] == ["eager", "onnxruntime"]
    assert report["prefill"][1]["ratio"] == pytest.approx(report["prefill"][1]["tokens_per_s"]
                                                          / report["prefill"][0]["tokens_per_s"])


def test_bench_runs_the_triton_path(world):
    """The GPU path goes through the same command (here on the CPU, under Triton's interpreter)."""
    folder = registry()["triton"].build(checkpoint.load(world["model"]).model, world["root"] / "triton",
                                        capacity=CAPACITY, policy="drop")
    code, output = run("bench", folder, "--context", 16, "--fill", 0.5, "--iterations", 1, "--repeats", 1,
                       "--warmup", 0, "--prompt", 4, "--json", "-")
    assert code == 0, output
    [row] = json.loads(output)["decode"]
    assert (row["backend"], row["entries"]) == ("triton", 8) and row["median_ms"] > 0


def test_bench_prints_markdown_tables(world):
    code, output = run("bench", world["model"], world["onnx"], "--context", 32, "--fill", 3, "--iterations", 1,
                       "--repeats", 1, "--warmup", 0, "--prompt", 4, "--markdown")
    assert code == 0, output
    rows = [line for line in output.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert rows[0].startswith("| artifact | backend | fill |") and "| prompt |" in rows[3]
    assert len(rows) == 6 and "| eager | 3 | 0 | 1 |" in rows[1] and "| onnxruntime | 1 | 4 |" in rows[5]


@pytest.mark.parametrize(("args", "phrase"), [
    (("--fill", "1.5"), "neither a fraction"),
    (("--fill", "own"), "give --model CHECKPOINT"),
    (("--iterations", "2", "--repeats", "3"), "--iterations"),
])
def test_bench_bad_options_are_exit_2(world, args, phrase):
    code, output = run("bench", world["onnx"], "--context", 64, *args)
    assert code == 2 and phrase in output, output
