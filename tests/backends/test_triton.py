"""The Triton backend beyond the parity suite: the state stays where it lies (caches, GDN state and lengths keep
their storage from step to step), the artifact is a checkpoint, and what the runner refuses.

Here the kernels run on CPU tensors under Triton's interpreter; on a GPU the same runner runs them on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from ham_export.backends import get, load_runner
from ham_export.backends.triton import TritonRunner
from ham_export.core import checkpoint
from ham_export.errors import InputError

from ..conftest import make_small_model
from .conftest import requires


@pytest.fixture(scope="module")
def model():
    return make_small_model()


def test_decode_updates_the_state_in_place(model):
    requires("triton")
    with TritonRunner.for_model(model, 16, "drop", device="cpu") as runner:
        tau = torch.full((model.cfg.n_layers,), -1.0)
        _, state = runner.prefill(torch.tensor([[1, 2, 3]]), tau)
        before = [(s.ssm.data_ptr(), s.conv.data_ptr(), s.k_cache.data_ptr(), s.length.data_ptr()) for s in state]
        _, new_state = runner.step(torch.tensor([4]), tau, state)
        assert [(s.ssm.data_ptr(), s.conv.data_ptr(), s.k_cache.data_ptr(), s.length.data_ptr())
                for s in new_state] == before
        assert all(int(s.length) == 4 for s in new_state)


def test_the_artifact_is_a_checkpoint(model, tmp_path):
    folder = get("triton").build(model, tmp_path / "art", capacity=16, policy="evict")
    loaded = checkpoint.load(folder)
    assert checkpoint.weights_sha256(loaded.model) == checkpoint.weights_sha256(model)
    requires("triton")
    with load_runner(folder) as runner:
        assert isinstance(runner, TritonRunner) and (runner.capacity, runner.policy) == (16, "evict")
        runner.check_model(model)


def test_refusals(model, monkeypatch):
    requires("triton")
    with pytest.raises(InputError, match="drop or evict"):
        TritonRunner.for_model(model, 8, "error", device="cpu")
    monkeypatch.setenv("HAM_FORCE_REFERENCE", "1")
    with pytest.raises(InputError, match="asks for the reference"):
        TritonRunner.for_model(model, 8, "drop", device="cpu").open()
    monkeypatch.delenv("HAM_FORCE_REFERENCE")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        TritonRunner.for_model(model, 8, "drop", device="cpu").open()
