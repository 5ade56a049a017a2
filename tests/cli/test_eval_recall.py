"""``ham-export eval --task recall``: one row per context x threshold, the task taken from the checkpoint where it
was trained on one, JSON as ``eval``'s; impossible tasks are exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ham_export.cli import main
from ham_export.core import checkpoint

from ..conftest import make_small_model

TRAINED = {"context": 80, "pairs": 4, "queries": 2, "key_len": 1, "value_len": 1, "gap": 0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    model = make_small_model()
    return {"trained": checkpoint.save_pt(model, root / "recall.pt", {"recall": TRAINED}),
            "text": checkpoint.save_pt(model, root / "text.pt")}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_rows_per_context_and_threshold(models):
    code, output = run("eval", models["trained"], "--task", "recall", "--context", 64, "--context", 96,
                       "--threshold", -1, "--threshold", 3, "--sequences", 4, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["task"] == {"name": "recall", **{k: v for k, v in TRAINED.items() if k != "context"}}
    rows = report["rows"]
    assert [(r["context"], r["threshold"]) for r in rows] == [(64, -1.0), (64, 3.0), (96, -1.0), (96, 3.0)]
    assert all(r["task"] == "recall" and 0.0 <= r["accuracy"] <= r["byte_accuracy"] + 1e-9 <= 1.0 + 1e-9
               for r in rows)
    assert all(r["values"] == 4 * TRAINED["queries"] for r in rows)
    assert [r["kv_fraction"] for r in rows] == [1.0, 0.0, 1.0, 0.0]


def test_the_trained_task_is_the_default_and_options_replace_its_parameters(models):
    code, output = run("eval", models["trained"], "--task", "recall", "--sequences", 2, "--pairs", 6,
                       "--queries", 6, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["rows"][0]["context"] == TRAINED["context"] and report["task"]["pairs"] == 6
    code, output = run("eval", models["text"], "--task", "recall", "--sequences", 2)
    assert code == 0 and "recall of 16 values of 32 records" in output, output  # the task's defaults


@pytest.mark.parametrize(("args", "phrase"), [(("--context", 16), "do not fit"),
                                              (("--queries", 9), "queries need as many pairs")])
def test_impossible_tasks_are_exit_2(models, args, phrase):
    code, output = run("eval", models["trained"], "--task", "recall", *args)
    assert code == 2 and phrase in output, output
