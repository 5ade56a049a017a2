"""One parity suite over every registered backend: each artifact against the eager model, step by step.

For each backend variant (``conftest.VARIANTS``) and each small-model setting (router x overflow policy, with a cache
the prompt and decode steps overflow; one model's scores saturate, so that evictions meet exact and 1-ulp ties),
and for the bundled model: the comparator (:mod:`ham_export.check.compare`)
runs a prefill and decode steps on both and compares logits, router scores, route decisions (exactly), GDN state,
conv tails, cache lengths, overflow counts and every valid cache entry, at the model's own thresholds, at -1 (cache
every token), at 3 (cache none), and at a threshold in a gap between the scores. No route may flip, near the
threshold or far from it, and no eviction may be a near tie: every sequence is compared to the last step.
"""

from __future__ import annotations

import pytest

from ham_export.backends import registry
from ham_export.backends.eager import EagerRunner, eager_runner_like
from ham_export.check.compare import DEFAULT_TOLERANCE, compare
from ham_export.check.prompts import default_prompts
from ham_export.check.thresholds import threshold_in_gap

from .conftest import (
    SMALL_CAPACITY,
    SMALL_SETTINGS,
    SMALL_STEPS,
    VARIANTS,
    build,
    open_runner,
    requires,
    small_prompts,
    variants,
)

BUNDLED_CAPACITY = 160  # 48-byte prompts + the steps overflow it at tau = -1
BUNDLED_STEPS = {"triton": 8}  # the interpreter is slow; every other backend runs 48 steps
ATOL = RTOL = MARGIN = 1e-4


def test_every_backend_has_a_fixture_entry():
    assert set(registry()) == set(VARIANTS), "add the new backend to tests/backends/conftest.py VARIANTS"


def assert_parity(results, settings_count: int) -> None:
    assert len(results) == settings_count
    for r in results:
        assert r.passed, (r.threshold, r.failures)
        assert r.far_flips == 0 and r.near_flips == 0 and r.near_ties == 0, r.threshold
        assert r.compared_sequences == r.sequences, r.threshold


SMALL = [pytest.param(backend, options, file, router, policy, id=f"{variant}-{router}-{policy}")
         for backend, variant, options, file in variants() for router, policy in SMALL_SETTINGS]


@pytest.fixture(scope="module")
def small_artifacts(small_models, tmp_path_factory):
    """(backend, options, file, router, policy) -> artifact path, built on first use."""
    cache = {}

    def get(backend, options, file, router, policy):
        key = (backend, tuple(sorted(options.items())), router, policy)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{backend}-{router}-{policy}")
            cache[key] = build(backend, options, file, small_models[router], folder, SMALL_CAPACITY, policy)
        return cache[key]
    return get


@pytest.mark.parametrize(("backend", "options", "file", "router", "policy"), SMALL)
def test_small_model_equals_eager_under_overflow(backend, options, file, router, policy, small_models,
                                                 small_artifacts, gap_thresholds):
    requires(backend)
    model = small_models[router]
    with open_runner(small_artifacts(backend, options, file, router, policy)) as runner:
        assert (runner.capacity, runner.policy) == (SMALL_CAPACITY, policy)
        settings = [list(model.cfg.thresholds), -1.0, 3.0, gap_thresholds(router, policy)]
        results = compare(EagerRunner(model, SMALL_CAPACITY, policy), runner, small_prompts(), settings,
                          SMALL_STEPS, ATOL, RTOL, MARGIN)
        assert_parity(results, 4)
        assert results[1].kv_fraction == 1.0 and results[2].kv_fraction == 0.0
        assert 0.0 < results[3].kv_fraction < 1.0
        out, _ = runner.prefill(small_prompts(), -1.0)
        assert out.cpu().overflow.tolist() == [[4, 4, 4]] * model.cfg.n_layers  # 16 routed, 12 slots


BUNDLED = [pytest.param(backend, options, file, id=variant) for backend, variant, options, file in variants()]


@pytest.fixture(scope="module")
def bundled_gap(bundled):
    return threshold_in_gap(EagerRunner(bundled, BUNDLED_CAPACITY, "drop"), default_prompts(), 48)


@pytest.mark.parametrize(("backend", "options", "file"), BUNDLED)
def test_bundled_model_equals_eager(backend, options, file, bundled, bundled_gap, tmp_path):
    requires(backend)
    from .conftest import BUNDLED as path

    artifact = build(backend, options, file, bundled, tmp_path, BUNDLED_CAPACITY, "drop", source=path)
    steps = BUNDLED_STEPS.get(backend, 48)
    with open_runner(artifact) as runner:
        runner.check_model(bundled)
        atol, rtol, margin = DEFAULT_TOLERANCE[runner.dtype]
        settings = [list(bundled.cfg.thresholds), -1.0, 3.0, bundled_gap]
        results = compare(eager_runner_like(bundled, runner), runner, default_prompts(), settings, steps, atol,
                          rtol, margin)
    assert_parity(results, 4)
    assert [r.kv_fraction for r in results[1:3]] == [1.0, 0.0]
    assert 0.0 < results[0].kv_fraction < 1.0 and 0.0 < results[3].kv_fraction < 1.0
    assert max(r.max_abs_err for r in results) <= 1e-4
