"""The CLI: JSON shapes, exit codes, and one line of error (never a traceback) for a user's mistake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ham_export.cli import main
from ham_export.core import checkpoint
from ham_export.memory.sizes import byte_table

from ..conftest import make_small_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = make_small_model()
    model.cfg = model.cfg.with_thresholds([0.4, 0.6])
    return checkpoint.save_pt(model, tmp_path_factory.mktemp("ckpt") / "small.pt", {"note": "test"})


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_inspect_json(ckpt):
    code, output = run("inspect", ckpt, "--json")
    assert code == 0
    info = json.loads(output)
    cfg = checkpoint.load(ckpt).config
    assert info["thresholds"] == [0.4, 0.6] and info["router"] == "cosine"
    assert info["parameters"] == checkpoint.load(ckpt).model.num_parameters()
    fp32 = info["bytes"]["fp32"]
    # Hand count for the small config: H=2, K=V=8, W=4, D=2*(8+8+8)=48, 2 layers.
    assert fp32["fixed_state_per_sequence_per_layer"] == (2 * 8 * 8 + 3 * 48) * 4 + 8
    assert fp32["kv_per_cached_token"] == 2 * 2 * (8 + 8) * 4
    assert info["bytes"]["fp16"]["kv_per_cached_token"] == fp32["kv_per_cached_token"] // 2
    assert info["bytes"] == byte_table(cfg, info["parameters"])


def test_inspect_table(ckpt):
    code, output = run("inspect", ckpt)
    assert code == 0 and "thresholds" in output and "0.4000, 0.6000" in output


def test_eval_json_rows(ckpt, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, output = run("eval", ckpt, "--data", data, "--threshold", "-1", "--threshold", "3", "--window", "64",
                       "--json")
    assert code == 0, output
    rows = json.loads(output)["rows"]
    assert [r["threshold"] for r in rows] == [-1.0, 3.0]
    assert rows[0]["kv_fraction"] == 1.0 and rows[1]["kv_fraction"] == 0.0
    assert all(0 < r["bits_per_byte"] < 16 and len(r["kv_fraction_per_layer"]) == 2 for r in rows)
    code, output = run("eval", ckpt, "--data", data, "--json")
    assert code == 0 and json.loads(output)["rows"][0]["threshold"] == [0.4, 0.6]


@pytest.mark.parametrize("args, message", [
    (["eval", "{ckpt}", "--threshold", "nan"], "finite"),
    (["eval", "{ckpt}", "--data", "/nonexistent.txt"], "data file not found"),
    (["inspect", "/nonexistent.pt"], "checkpoint not found"),
    (["inspect", "{broken}"], "truncated"),
])
def test_bad_input_exits_2_with_one_clear_line(ckpt, tmp_path, args, message):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    code, output = run(*[a.format(ckpt=ckpt, broken=broken) for a in args])
    assert code == 2
    assert message in output and "Traceback" not in output


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "ham_export.cli", "inspect", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
