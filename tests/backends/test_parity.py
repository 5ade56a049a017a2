"""One parity suite over every registered backend: each artifact against the eager model, step by step.

For each backend variant (``conftest.VARIANTS``) and each small-model setting (router x overflow policy, with a cache
the prompt and decode steps overflow; one model's scores saturate, so that evictions meet exact and 1-ulp ties),
and for the bundled model: the comparator (:mod:`ham_export.check.compare`)
runs a prefill and decode steps on both and compares logits, router scores, route decisions (exactly), GDN state,
conv tails, cache lengths, overflow counts and every valid cache entry, at the model's own thresholds, at -1 (cache
every token), at 3 (cache none), and at a threshold in a gap between the scores. No route may flip, near the
threshold or far from it, and no eviction may be a near tie: every sequence is compared to the last step. The
bundled recall model (whose cache decides its answers) runs on sequences of its task, with a cache they overflow.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ham_export.backends import MANIFEST, ArtifactError, registry
from ham_export.backends.eager import EagerRunner, eager_runner_like
from ham_export.check.compare import DEFAULT_TOLERANCE, compare
from ham_export.check.prompts import default_prompts
from ham_export.check.thresholds import threshold_in_gap
from ham_export.errors import InputError

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


RECALL_MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "recall-ham.pt"
RECALL_CAPACITY = 72  # the 96-byte sequences + the steps overflow it at tau = -1 (policy evict)


@pytest.fixture(scope="module")
def recall_case():
    """The recall HAM model and four sequences of its task, 96 bytes each, ending in a query's key and separator."""
    from ham_export.core import checkpoint
    from ham_export.core.data import pydoc_corpus
    from ham_export.train.recall import RecallTask, make_batch

    model = checkpoint.load(RECALL_MODEL).model
    task = RecallTask(context=97, pairs=6, queries=3, key_len=2, value_len=1)
    batch = make_batch(task, pydoc_corpus().held_out, 4, torch.Generator().manual_seed(3))
    return model, batch.tokens[:, :-1]  # the last value is what the first step answers


@pytest.mark.parametrize(("backend", "options", "file"), BUNDLED)
def test_recall_model_equals_eager(backend, options, file, recall_case, tmp_path):
    requires(backend)
    model, prompts = recall_case
    artifact = build(backend, options, file, model, tmp_path, RECALL_CAPACITY, "evict", source=RECALL_MODEL)
    with open_runner(artifact) as runner:
        atol, rtol, margin = DEFAULT_TOLERANCE[runner.dtype]
        settings = [list(model.cfg.thresholds), -1.0, 3.0]
        results = compare(eager_runner_like(model, runner), runner, prompts, settings,
                          BUNDLED_STEPS.get(backend, 16), atol, rtol, margin)
    assert_parity(results, 3)
    assert [r.kv_fraction for r in results[1:]] == [1.0, 0.0]
    assert 0.0 < results[0].kv_fraction < 0.5  # the model's own small cache


def test_token_ids_outside_the_vocabulary_poison_only_their_sequence(small_models, small_artifacts):
    """Under the runner's checks, straight into the programs: an id outside [0, vocab) gives its sequence NaN
    logits from that token on (earlier ones too where a prefill mixes the tokens of a chunk), not the embedding of
    id mod vocab nor an out-of-bounds read; the other sequences are unaffected."""
    model = small_models["cosine"]
    tokens = small_prompts()[:3].clone()
    tokens[0, 5], tokens[2, 0] = -1, model.cfg.vocab_size
    eager = EagerRunner(model, SMALL_CAPACITY, "drop")
    want, _ = eager.prefill(small_prompts()[:3], -1.0)
    for backend, variant, options, file in variants():
        if registry()[backend].requires() is not None:
            continue
        with open_runner(small_artifacts(backend, options, file, "cosine", "drop")) as runner:
            got, _ = runner._prefill(tokens, runner.check_thresholds(-1.0))  # past the runner's own check
            logits = got.cpu().logits
            assert bool(logits[0, 5:].isnan().all()) and bool(logits[2].isnan().all()), variant
            torch.testing.assert_close(logits[1], want.logits[1], atol=1e-4, rtol=1e-4, msg=variant)
            with pytest.raises(InputError, match=r"token ids must be in \[0, 256\)"):
                runner.prefill(tokens, -1.0)


def _fuzz_tokens(draw, n_seq: int, dims: int):
    """Tokens for a prefill (dims 2) or a step (dims 1): valid, or wrong in one way."""
    kind = draw(st.sampled_from(["valid", "valid", "low", "high", "huge", "int32", "float", "dims", "empty"]))
    shape = (n_seq, draw(st.integers(1, 6))) if dims == 2 else (n_seq,)
    tokens = torch.tensor(draw(st.lists(st.integers(0, 255), min_size=math.prod(shape),
                                        max_size=math.prod(shape)))).reshape(shape)
    bad = {"low": -draw(st.integers(1, 300)), "high": draw(st.integers(256, 1000)), "huge": 10**12}
    if kind in bad:
        tokens.view(-1)[draw(st.integers(0, tokens.numel() - 1))] = bad[kind]
    return {"int32": tokens.int(), "float": tokens.float(), "dims": tokens.reshape(-1, 1, *shape[1:]),
            "empty": tokens[..., :0] if dims == 2 else tokens[:0]}.get(kind, tokens), kind in ("valid", "int32")


def _fuzz_thresholds(draw, n_layers: int):
    """Thresholds: valid, or wrong in one way."""
    value = draw(st.sampled_from([-1.0, 0.3, 3.0, float("nan"), float("inf"), "x"]))
    kind = draw(st.sampled_from(["scalar", "per-layer", "tensor", "int-tensor", "wrong-count"]))
    if kind == "scalar" or value == "x":
        given = value
    elif kind == "per-layer":
        given = [value] * n_layers
    elif kind == "tensor":
        given = torch.full((n_layers,), value)
    elif kind == "int-tensor":
        given = torch.full((n_layers,), int(value) if math.isfinite(value) else 0, dtype=torch.int64)
    else:
        given = [value] * (n_layers + 1)
    valid = value != "x" and math.isfinite(value) and kind != "wrong-count"
    return given, valid


@pytest.mark.parametrize(("backend", "options", "file"), BUNDLED)
def test_runner_fuzz_gives_a_clean_error_or_the_eager_answer(backend, options, file, small_models,
                                                            small_artifacts):
    """Random token tensors and thresholds (valid or wrong: ids outside the vocabulary, dtypes, dims, empty,
    NaN, inf, counts) into prefill and step: an InputError, or the eager model's answer; never a crash."""
    requires(backend)
    model = small_models["learned"]
    eager = EagerRunner(model, SMALL_CAPACITY, "evict")
    with open_runner(small_artifacts(backend, options, file, "learned", "evict")) as runner:

        @settings(max_examples=12, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(data=st.data())
        def fuzz(data):
            tokens, tokens_ok = _fuzz_tokens(data.draw, 2, 2)
            tau, tau_ok = _fuzz_thresholds(data.draw, model.cfg.n_layers)
            if not (tokens_ok and tau_ok):
                with pytest.raises(InputError):
                    runner.prefill(tokens, tau)
                return
            got, state = runner.prefill(tokens, tau)
            want, eager_state = eager.prefill(tokens, tau)
            torch.testing.assert_close(got.cpu().logits, want.logits, atol=1e-4, rtol=1e-4)
            token, token_ok = _fuzz_tokens(data.draw, 2, 1)
            if not token_ok:
                with pytest.raises(InputError):
                    runner.step(token, tau, state)
                token = want.logits[:, -1].argmax(-1)  # the state is unchanged by a refused step
            got, _ = runner.step(token, tau, state)
            want, _ = eager.step(token, tau, eager_state)
            torch.testing.assert_close(got.cpu().logits, want.logits, atol=1e-4, rtol=1e-4)

        fuzz()


def _lying_copy(artifact: Path, file: str | None, folder: Path, edit) -> Path:
    """A copy of an artifact whose manifest ``edit(data)`` changed."""
    shutil.copytree(artifact.parent if file else artifact, folder)
    data = json.loads((folder / MANIFEST).read_text())
    edit(data)
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder / file if file else folder


def test_a_manifest_that_lies_about_its_programs_is_refused(small_artifacts, tmp_path):
    """Every backend compares the manifest's fields with what its programs are (the graph's signature, the
    signature compiled into the package, a probe run, or the weights' config) when it opens an artifact."""
    for backend, variant, options, file in variants():
        if registry()[backend].requires() is not None:
            continue
        artifact = small_artifacts(backend, options, file, "cosine", "drop")
        if backend == "triton":  # the capacity is the runner's to allocate: the lie is about the model
            lie, phrase = (lambda d: d["model"].update(mlp_hidden=65)), "mlp_hidden: 64, the manifest says 65"
        else:
            lie, phrase = (lambda d: d.update(capacity=2 * SMALL_CAPACITY)), f"capacity {2 * SMALL_CAPACITY}"
        with pytest.raises(ArtifactError, match=phrase):
            open_runner(_lying_copy(artifact, file, tmp_path / variant, lie))
