"""The TVM backend beyond the parity suite: dynamic batch and prompt length, in-place decode, a torch state is never
modified, a library that loads without ham_export, CUDA code generation checked by nvcc, and bad inputs.

Each module-scoped fixture compiles one artifact (about 15 s on 2 cores); the tests share them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'ham-export[tvm]')")

from ham_export.backends import ArtifactError, load_runner, registry
from ham_export.backends.eager import EagerRunner
from ham_export.backends.programs import flatten_state
from ham_export.check.compare import compare
from ham_export.cli import main
from ham_export.errors import InputError

from ..conftest import make_small_model
from .conftest import BUNDLED


def export_tvm(model, out, capacity, policy, target="llvm"):
    return registry()["tvm"].build(model, out, capacity=capacity, policy=policy, target=target)
ATOL = RTOL = MARGIN = 1e-4
SMALL_CAPACITY = 8  # a 6-token prompt + 6 steps at tau = -1 overflows it


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def small_model():
    return make_small_model()


@pytest.fixture(scope="module", params=["drop", "evict"])
def small_artifact(request, small_model, tmp_path_factory):
    folder = export_tvm(small_model, tmp_path_factory.mktemp(f"tvm-{request.param}"), SMALL_CAPACITY,
                        request.param)
    with load_runner(folder) as runner:
        yield request.param, runner


def prompts(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def test_batch_and_prompt_length_are_dynamic(small_model, small_artifact):
    _, runner = small_artifact
    eager = EagerRunner(small_model, SMALL_CAPACITY, runner.policy)
    for batch, length in ((1, 1), (3, 11)):
        results = compare(eager, runner, prompts(batch, length), [-1.0], 2, ATOL, RTOL, MARGIN)
        assert results[0].passed, results[0].failures


def test_decode_updates_the_caches_in_place(small_model, small_artifact):
    _, runner = small_artifact
    tau = torch.tensor(-1.0)
    _, state = runner.prefill(prompts(2, 3), tau)
    _, new_state = runner.step(torch.tensor([1, 2]), tau, state)
    fields = ("ssm", "conv", "k_cache", "v_cache", "score_cache", "length")
    for i, (old, new) in enumerate(zip(state, new_state, strict=True)):
        assert old.same_as(new) == (fields[i % 6] in ("k_cache", "v_cache", "score_cache")), fields[i % 6]


def test_nan_past_the_length_is_never_read_and_torch_state_is_not_modified(small_model, small_artifact):
    _, runner = small_artifact
    state = flatten_state(small_model.init_state(2, SMALL_CAPACITY, fill=float("nan")))
    before = [t.clone() for t in state]
    token, tau = torch.tensor([3, 4]), torch.tensor(-1.0)
    got, got_state = runner.step(token, tau, state)
    ref, _ = EagerRunner(small_model, SMALL_CAPACITY, runner.policy).step(
        token, tau, small_model.init_state(2, SMALL_CAPACITY, fill=float("nan")))
    assert torch.allclose(got.logits, ref.logits, atol=ATOL, rtol=RTOL)
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(state, before, strict=True))
    assert not runner.state_tensors(got_state)[2][:, :, :1].isnan().any()  # the first key landed in slot 0


def test_bad_inputs_give_clear_errors(small_artifact):
    _, runner = small_artifact
    tau = torch.tensor(0.5)
    with pytest.raises(InputError, match="token ids"):
        runner.prefill(torch.tensor([[300]]), tau)
    with pytest.raises(InputError, match="thresholds"):
        runner.prefill(torch.tensor([[1]]), torch.tensor([0.1, 0.2, 0.3]))
    _, state = runner.prefill(torch.tensor([[1, 2]]), tau)
    with pytest.raises(InputError, match="6 per layer"):
        runner.step(torch.tensor([1]), tau, state[:-1])
    with pytest.raises(InputError, match=r"past\.0\.ssm must be float32"):
        runner.step(torch.tensor([1, 2]), tau, state)  # a batch-1 state for two tokens


def test_the_libraries_run_without_ham_export(small_model, small_artifact, tmp_path):
    """The compiled programs need the TVM runtime alone: a process that never imports ham_export runs them."""
    _, runner = small_artifact
    folder = runner.manifest.directory
    manifest = json.loads((folder / "ham_export.json").read_text())
    assert manifest["backend"] == "tvm" and manifest["device"] == "cpu"
    # The libraries run with TVM alone, in a process that never imports ham_export.
    script = textwrap.dedent(f"""
        import sys, numpy as np, tvm
        from tvm import relax
        assert "ham_export" not in sys.modules
        vm = relax.VirtualMachine(tvm.runtime.load_module({str(folder / "prefill.so")!r}), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(np.array([[104, 105]], dtype="int64")),
                         tvm.runtime.tensor(np.full({manifest["model"]["n_layers"]}, -1.0, dtype="float32")))
        assert out[0].numpy().shape == (1, 2, 256) and int(out[9].numpy()[0]) == 2, out[9]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_cli_refuses_bad_options(tmp_path):
    code, output = run("tvm", BUNDLED, "-o", tmp_path / "x", "--from", "onnx")
    assert code == 2 and "Scan/Loop" in output
    code, output = run("tvm", BUNDLED, "-o", tmp_path / "x", "--target", "no-such-target")
    assert code == 2 and "unknown TVM target" in output
    code, output = run("tvm", tmp_path / "missing.pt", "-o", tmp_path / "x")
    assert code == 2


@pytest.fixture(scope="module")
def cuda_artifact(small_model, tmp_path_factory):
    return export_tvm(small_model, tmp_path_factory.mktemp("tvm-cuda"), SMALL_CAPACITY, "evict", "cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the generated CUDA is not compiled")
def test_cuda_source_compiles_for_sm90(cuda_artifact, tmp_path):
    for name in ("prefill", "decode"):
        source = cuda_artifact / f"{name}.cu"
        text = source.read_text()
        assert "ham_cache_append_evict_kernel" in text and "ham_cache_attention_kernel" in text
        assert (name == "prefill") == ("ham_gdn_prefill_kernel" in text)
        done = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / f"{name}.cubin"), str(source)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


def test_cuda_artifact_runs_on_a_gpu_or_says_why_not(small_model, cuda_artifact):
    import tvm

    if not tvm.cuda(0).exist:
        with pytest.raises(ArtifactError, match="no CUDA device"):
            load_runner(cuda_artifact).open()
        return
    eager = EagerRunner(small_model, SMALL_CAPACITY, "evict")
    with load_runner(cuda_artifact) as runner:
        results = compare(eager, runner, prompts(), [list(small_model.cfg.thresholds), -1.0, 3.0], 6, ATOL, RTOL,
                          MARGIN)
    assert all(r.passed for r in results), [r.failures for r in results]
