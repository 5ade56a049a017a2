"""The associative-recall task: its sequences are what the docstring says, its accuracy counts a value right only when
every byte is, and a model that does look the values up scores 1 where one that cannot scores about chance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ham_export.core.data import pydoc_corpus
from ham_export.errors import InputError
from ham_export.train import recall
from ham_export.train.train import TrainConfig, train

from ..conftest import make_small_model, small_config

TASK = recall.RecallTask(context=96, pairs=5, queries=3, key_len=2, value_len=2, gap=10)


def parse(seq: bytes, task: recall.RecallTask) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes, int]]]:
    """The records (key -> value) and the queries (key, value, index of the value) of a sequence."""
    records, queries = {}, []
    for i, byte in enumerate(seq):
        if byte in (recall.PAIR, recall.QUERY):
            key = seq[i + 1: i + 1 + task.key_len]
            assert seq[i + 1 + task.key_len] == recall.SEP
            start = i + 2 + task.key_len
            value = seq[start: start + task.value_len]
            if byte == recall.PAIR:
                records[key] = value
            else:
                queries.append((key, value, start))
    return records, queries


def test_sequences_hold_the_records_then_queries_for_them():
    text = recall.clean_text(pydoc_corpus().held_out)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        seq, positions = recall.make_sequence(TASK, text, gen)
        assert len(seq) == TASK.context
        records, queries = parse(seq, TASK)
        assert len(records) == TASK.pairs and len(queries) == TASK.queries
        assert all(set(k) <= set(recall.ALPHABET) and set(v) <= set(recall.ALPHABET) for k, v in records.items())
        assert all(records[k] == v for k, v, _ in queries)  # every query asks for an earlier record's value
        assert positions == [s + j for _, _, s in queries for j in range(TASK.value_len)]
        last_record = max(i for i, b in enumerate(seq) if b == recall.PAIR) + TASK.record_len
        first_query = min(i for i, b in enumerate(seq) if b == recall.QUERY)
        assert first_query - last_record >= TASK.gap


def test_sequences_are_drawn_from_the_seed():
    text = pydoc_corpus().held_out
    a = recall.make_batch(TASK, text, 3, torch.Generator().manual_seed(1))
    b = recall.make_batch(TASK, text, 3, torch.Generator().manual_seed(1))
    c = recall.make_batch(TASK, text, 3, torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)
    scored = a.targets != recall.IGNORE  # the prediction at t scores the byte at t + 1
    assert int(scored.sum()) == 3 * TASK.queries * TASK.value_len
    assert torch.equal(a.targets[:, :-1][scored[:, :-1]], a.tokens[:, 1:][scored[:, :-1]])


@pytest.mark.parametrize("bad", [dict(pairs=2, queries=3), dict(pairs=0), dict(context=40), dict(gap=-1),
                                 dict(key_len=1, pairs=40)])
def test_impossible_tasks_are_refused(bad):
    with pytest.raises(InputError, match="recall"):
        dataclasses.replace(TASK, **bad).check()


class Oracle(torch.nn.Module):
    """Looks every queried value up in its sequence, exactly (wrong on the second byte where ``miss_second``)."""

    def __init__(self, model, task, miss_second=False):
        super().__init__()
        self.model, self.task, self.miss_second = model, task, miss_second
        self.cfg = model.cfg

    def thresholds(self, threshold):
        return self.model.thresholds(threshold)

    def forward(self, tokens, tau):
        _, routes = self.model(tokens, tau)
        logits = torch.zeros(*tokens.shape, 256)
        for b in range(tokens.shape[0]):
            records, queries = parse(bytes(tokens[b].tolist()), self.task)
            for key, _, start in queries:
                for j, byte in enumerate(records[key]):
                    wrong = self.miss_second and j == 1
                    logits[b, start + j - 1, (byte + wrong) % 256] = 1.0
        return logits, routes


def test_accuracy_counts_a_value_right_only_when_all_its_bytes_are():
    model = make_small_model()
    text = pydoc_corpus().held_out
    [right] = recall.evaluate_recall(Oracle(model, TASK), TASK, text, sequences=8, batch_size=3)
    [half] = recall.evaluate_recall(Oracle(model, TASK, miss_second=True), TASK, text, sequences=8, batch_size=3)
    [untrained] = recall.evaluate_recall(model, TASK, text, sequences=8)
    assert (right.accuracy, right.byte_accuracy, right.values) == (1.0, 1.0, 8 * TASK.queries)
    assert (half.accuracy, half.byte_accuracy) == (0.0, 0.5)
    assert untrained.accuracy < 0.2 and 0.0 <= untrained.kv_fraction <= 1.0


def test_the_curriculum_opens_its_tasks_in_stages():
    short = dataclasses.replace(TASK, context=48, pairs=2, queries=2, gap=0)
    sample = recall.sampler([short, TASK], pydoc_corpus().train, stage_steps=3)
    gen = torch.Generator().manual_seed(0)
    widths = [sample(2, gen)[0].shape[1] for _ in range(40)]
    assert set(widths[:3]) == {48} and set(widths[3:]) == {48, 96}


def test_training_on_recall_lowers_the_loss_on_the_values():
    corpus = pydoc_corpus()
    rows = []
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=TASK.context, eval_every=30, f_target=None, tau_init=-1.0,
                      lr=1e-2, warmup_steps=2)

    def validate(model):
        return {"acc": recall.evaluate_recall(model, TASK, corpus.held_out, sequences=8)[0].accuracy}

    losses = []
    train(small_config(), cfg, corpus.train, corpus.held_out, log=rows.append, sampler=recall.sampler(
        [TASK], corpus.train), validate=validate, progress=lambda step, figures: losses.append(figures["loss"]))
    # random values over a 36-byte alphabet: a model that learns only their alphabet is at ln(36); a fresh one above
    assert losses[0] > 4.0 and sum(losses[-5:]) / 5 < 3.8
    assert "acc" in rows[-1]


def test_thresholds_for_fractions_cache_what_they_ask():
    model = make_small_model()
    text = pydoc_corpus().held_out
    fractions = [1.0, 0.5, 0.2, 0.0]
    taus = recall.thresholds_for_fractions(model, TASK, text, fractions, sequences=6, batch_size=4)
    assert taus[0] == [-1.0] * model.cfg.n_layers and taus[-1] == [3.0] * model.cfg.n_layers
    rows = recall.evaluate_recall(model, TASK, text, taus, sequences=6, batch_size=4)
    for f, row in zip(fractions, rows, strict=True):
        # layer 0's scores do not depend on the routes: its fraction is the one asked, up to ties and float32
        assert abs(row.kv_fraction_per_layer[0] - f) < 0.02
        assert row.thresholds == pytest.approx(taus[fractions.index(f)], rel=1e-6)
    with pytest.raises(InputError, match="fraction"):
        recall.thresholds_for_fractions(model, TASK, text, [1.5], sequences=2)
