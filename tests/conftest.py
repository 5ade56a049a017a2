"""Shared fixtures: small configs and models, seeded, that every test can afford on 2 CPU cores."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# The Triton kernels run on CPU tensors under Triton's interpreter in the tests. Triton reads the variable when it is
# first imported, when it decorates a kernel and while a kernel runs, so it is set for the whole session, before any
# test module imports a kernel. Tests that need compiled kernels (the sm_90 compiles, the gpu-marked tests) run them
# in child processes without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The memory report's fill runner is exported into the user's cache (ham_export.memory.fill.fast_runner): the tests
# use a cache of their own, so that they neither read a stale one nor leave files in the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ham-export-test-cache-")

import torch

from ham_export.core.config import HAMConfig
from ham_export.core.model import HAMLM

SMALL = dict(d_model=32, n_layers=2, n_heads=2, head_dim=8, head_dim_v=8, mlp_hidden=64, router_hidden=16,
             context_length=64)


def small_config(**overrides) -> HAMConfig:
    return HAMConfig(**{**SMALL, **overrides})


@pytest.fixture(params=["cosine", "learned"])
def router(request) -> str:
    return request.param


def make_small_model(router: str = "cosine", **overrides) -> HAMLM:
    torch.manual_seed(0)
    model = HAMLM(small_config(router=router, **overrides), seed=0)
    # Break the symmetry of a fresh init so that the layers route differently from each other.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_saturated_model() -> HAMLM:
    """A cosine-router model whose scores saturate: one value per head (d_v = 1), so 1 - cos(vhat, v) is 0 or 2 up
    to rounding (0 and 2^-24 for one score computed two ways), and evictions meet exact and 1-ulp ties."""
    return make_small_model("cosine", head_dim_v=1)


@pytest.fixture
def small_model(router) -> HAMLM:
    return make_small_model(router)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)
