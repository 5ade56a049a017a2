"""The shipped models load, behave as their training says, and the README's commands run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from ham_export.cli import main
from ham_export.core import checkpoint
from ham_export.core.data import pydoc_corpus
from ham_export.train.evaluate import evaluate

ROOT = Path(__file__).parents[2]
MODELS = ROOT / "examples" / "models"


@pytest.fixture(scope="module")
def held_out():
    return pydoc_corpus().held_out


def test_bundled_ham_caches_about_half_at_its_own_thresholds(held_out):
    ckpt = checkpoint.load(MODELS / "tiny-ham.pt")
    assert ckpt.metadata["held_out_sha256"] == pydoc_corpus().held_out_sha256
    own, everything, nothing = evaluate(ckpt.model, held_out, [None, -1.0, 3.0])
    assert 0.3 < own.kv_fraction < 0.7  # trained with f_target = 0.5
    assert everything.kv_fraction == 1.0 and nothing.kv_fraction == 0.0
    assert all(1.0 < r.bits_per_byte < 3.0 for r in (own, everything, nothing))


@pytest.mark.parametrize("name, tau", [("tiny-full", -1.0), ("tiny-gdn", 3.0)])
def test_baselines_have_fixed_thresholds(name, tau):
    for path in (MODELS / f"{name}.pt", MODELS / name):
        ckpt = checkpoint.load(path)
        assert ckpt.config.thresholds == (tau,) * ckpt.config.n_layers
        assert ckpt.metadata["store"] == ("all" if tau < 0 else "none")


def readme_commands(subcommands: set[str]) -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            line = line.split("#", 1)[0].strip()
            if line.startswith("ham-export "):
                args = shlex.split(line)[1:]
                if args[0] in subcommands:
                    commands.append(args)
    return commands


@pytest.mark.parametrize("args", readme_commands({"inspect", "eval"}), ids=" ".join)
def test_readme_command_runs(args, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def test_readme_python_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / "README.md").read_text()
    [block] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (1, 256)
