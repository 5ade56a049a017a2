"""The training loop: the threshold control law, determinism, and both routers."""

from __future__ import annotations

import torch

from ham_export.core.data import pydoc_corpus
from ham_export.train.train import TrainConfig, train, update_thresholds

from ..conftest import small_config


def test_control_law_moves_tau_toward_the_target():
    taus = update_thresholds((0.5, 0.5, 0.5), [0.9, 0.5, 0.1], f_target=0.5, eta=0.1)
    assert taus[0] > 0.5 and taus[1] == 0.5 and taus[2] < 0.5  # caching too much raises tau
    assert abs(taus[0] - 0.54) < 1e-12


def short_run(router="cosine", **overrides):
    corpus = pydoc_corpus()
    cfg = TrainConfig(**{**dict(steps=12, batch_size=4, seq_len=48, eval_every=12, tau_warmup_steps=2,
                                tau_eta=0.05, f_target=0.5, seed=3), **overrides})
    rows = []
    model, meta = train(small_config(router=router), cfg, corpus.train[:50_000], corpus.held_out[:2_000],
                        log=rows.append)
    return model, meta, rows


def test_training_is_deterministic_and_calibrates_thresholds():
    a, meta, rows = short_run(tau_init=-1.0)  # starts caching everything: the loop must raise tau
    b, _, _ = short_run(tau_init=-1.0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.cfg.thresholds == b.cfg.thresholds
    assert all(t > -1.0 for t in a.cfg.thresholds)
    assert rows[-1]["step"] == 12 and rows[-1]["val_bpb"] < 8.0
    assert meta["parameters"] == a.num_parameters()


def test_fixed_thresholds_stay_fixed_and_learned_router_trains():
    model, _, _ = short_run(router="learned", f_target=None, tau_init=0.5)
    assert model.cfg.thresholds == (0.5, 0.5)
    fresh, _, _ = short_run(router="learned", f_target=None, tau_init=0.5, steps=1)
    moved = [not torch.equal(p, q) for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(),
                                                               strict=True) if "router" in n]
    assert any(moved)


def test_trained_metadata_round_trips_through_a_safe_checkpoint(tmp_path):
    from ham_export.core import checkpoint

    model, meta, _ = short_run(steps=2)
    loaded = checkpoint.load(checkpoint.save_pt(model, tmp_path / "m.pt", meta))
    assert loaded.metadata == meta and loaded.config == model.cfg


def test_run_log_writes_each_row_to_the_log_as_json(tmp_path):
    import json

    from ham_export.train.train import run_log

    with run_log(tmp_path / "runs" / "m.pt", 2, "loss") as (log, progress):
        progress(1, {"loss": 2.5, "kv_fraction": 0.5})
        log({"step": 1, "val_bpb": 2.0})
        log({"done": "m.pt"})
    rows = [json.loads(line) for line in (tmp_path / "runs" / "m.log.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "val_bpb": 2.0}, {"done": "m.pt"}]
