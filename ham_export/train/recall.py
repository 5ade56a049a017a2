"""A synthetic associative-recall task, byte-level, in the spirit of Zoology's multi-query associative recall and
RULER's needle tests: the task where a cache of the right tokens decides the answer.

A sequence of ``context`` bytes is distractor text (real text of the corpus) into which ``pairs`` key-value records
``PAIR k1..kK SEP v1..vV`` are written at random places, and which ends with ``queries`` query records
``QUERY k1..kK SEP v1..vV``, each for the key of an earlier record, in random order. Keys and values are random
strings over :data:`ALPHABET` (keys distinct within a sequence); the three markers are control bytes that the text
never holds. Between the last record and the first query lie at least ``gap`` bytes of text, so every answer lies at
least that far back. The model must emit each queried value after its ``SEP``: a value counts as right when the
argmax of every one of its bytes is right given the bytes before it (with teacher forcing this equals greedy
decoding of the value). Sequences are drawn deterministically from a seed.

Because the values are random, no amount of language modelling predicts them: a model must keep the records,
exactly, over the distractor text. A HAM router sees random key and value bytes as badly predicted and caches them;
the text around them it need not cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.model import HAMLM
from ..errors import InputError

PAIR, QUERY, SEP = 0x01, 0x02, 0x03  # markers: control bytes, absent from the corpus text
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"
IGNORE = -100  # the target of a position that is not scored


@dataclass(frozen=True)
class RecallTask:
    """The task's parameters: sequence bytes, records, queries, key and value lengths, and the least distance in
    bytes between the last record and the first query."""

    context: int = 512
    pairs: int = 32
    queries: int = 16
    key_len: int = 2
    value_len: int = 1
    gap: int = 0

    @property
    def record_len(self) -> int:
        return 2 + self.key_len + self.value_len

    def check(self) -> None:
        """Refuse parameters no sequence can be built from."""
        if min(self.pairs, self.queries, self.key_len, self.value_len) < 1 or self.gap < 0:
            raise InputError("recall: pairs, queries, key and value lengths must be at least 1 and gap at least 0")
        if self.queries > self.pairs:
            raise InputError(f"recall: {self.queries} queries need as many pairs, got {self.pairs}")
        if self.pairs > len(ALPHABET) ** self.key_len // 2:
            raise InputError(f"recall: {self.pairs} distinct keys of {self.key_len} bytes are too many")
        if (self.pairs + self.queries) * self.record_len + self.gap + 1 > self.context:
            raise InputError(f"recall: {self.pairs} pairs and {self.queries} queries of {self.record_len} bytes and "
                             f"a gap of {self.gap} do not fit in {self.context} bytes")


@dataclass(frozen=True)
class RecallBatch:
    """Sequences [B, context] (int64) and, per position, the target byte where it is a value byte to be predicted
    from the byte before it (``IGNORE`` elsewhere): ``targets[:, t]`` scores the prediction made at ``t``."""

    tokens: torch.Tensor
    targets: torch.Tensor


def _random_string(gen: torch.Generator, n: int) -> bytes:
    return bytes(ALPHABET[i] for i in torch.randint(0, len(ALPHABET), (n,), generator=gen).tolist())


def make_sequence(task: RecallTask, text: bytes, gen: torch.Generator) -> tuple[bytes, list[int]]:
    """One sequence and the positions of its queried value bytes (each the index of the byte to be predicted)."""
    keys: list[bytes] = []
    while len(keys) < task.pairs:
        key = _random_string(gen, task.key_len)
        if key not in keys:
            keys.append(key)
    values = [_random_string(gen, task.value_len) for _ in range(task.pairs)]
    query_len = task.queries * task.record_len
    body = task.context - query_len - task.gap  # records lie in body; then the gap and the queries
    filler = body - task.pairs * task.record_len
    start = int(torch.randint(0, max(1, len(text) - task.context), (1,), generator=gen))
    distractor = text[start: start + task.context]
    # Where each record goes: sorted offsets into the filler text, one per record.
    cuts = sorted(torch.randint(0, filler + 1, (task.pairs,), generator=gen).tolist())
    out = bytearray()
    used = 0
    for cut, key, value in zip(cuts, keys, values, strict=True):
        out += distractor[used:cut]
        used = cut
        out += bytes([PAIR]) + key + bytes([SEP]) + value
    out += distractor[used: filler + task.gap]
    positions = []
    for i in torch.randperm(task.pairs, generator=gen)[: task.queries].tolist():
        out += bytes([QUERY]) + keys[i] + bytes([SEP])
        positions.extend(range(len(out), len(out) + task.value_len))
        out += values[i]
    assert len(out) == task.context, (len(out), task.context)
    return bytes(out), positions


def clean_text(text: bytes) -> bytes:
    """The text without the marker bytes (none are expected in the corpus; a file given by a user may hold them)."""
    return text.translate(None, bytes([PAIR, QUERY, SEP]))


def make_batch(task: RecallTask, text: bytes, batch_size: int, gen: torch.Generator) -> RecallBatch:
    """``batch_size`` sequences and their targets."""
    task.check()
    if len(text) < task.context:
        raise InputError(f"recall: the distractor text ({len(text)} bytes) is shorter than the context "
                         f"({task.context})")
    tokens = torch.empty(batch_size, task.context, dtype=torch.int64)
    targets = torch.full((batch_size, task.context), IGNORE, dtype=torch.int64)
    for b in range(batch_size):
        seq, positions = make_sequence(task, text, gen)
        tokens[b] = torch.frombuffer(bytearray(seq), dtype=torch.uint8).to(torch.int64)
        index = torch.tensor(positions)
        targets[b, index - 1] = tokens[b, index]
    return RecallBatch(tokens, targets)


def sampler(tasks: Sequence[RecallTask], text: bytes, stage_steps: int = 0
            ) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """A training batch sampler for :func:`~ham_export.train.train.train`: (inputs, targets) with the loss on the
    queried values only. ``tasks`` are a curriculum, shortest first: batch ``i`` is of one of the first
    ``1 + i // stage_steps`` tasks, drawn at random (all of them from the start when ``stage_steps`` is 0). The
    short sequences teach the lookup, which then carries to the long ones."""
    text = clean_text(text)
    for task in tasks:
        task.check()
    calls = 0

    def sample(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        open_tasks = len(tasks) if stage_steps <= 0 else min(len(tasks), 1 + calls // stage_steps)
        calls += 1
        task = tasks[int(torch.randint(0, open_tasks, (1,), generator=gen))]
        batch = make_batch(task, text, batch_size, gen)
        return batch.tokens, batch.targets

    return sample


def recall_documents(task: RecallTask, text: bytes, window: int, count: int, seed: int = 1234
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences of ``task`` of ``window`` bytes drawn from ``seed`` with ``text`` as distractor, in the
    memory report's document form: tokens [D, window + 1] (inputs and next bytes) and the targets [D, window]
    (``IGNORE`` where nothing is asked)."""
    full = dataclasses.replace(task, context=window + 1)
    batch = make_batch(full, clean_text(text), count, torch.Generator().manual_seed(seed))
    return batch.tokens, batch.targets[:, :-1]


def trained_task(metadata: dict) -> RecallTask:
    """The task a checkpoint's metadata names (``"recall"``, as ``examples/train_recall.py`` writes it), else the
    default task."""
    trained = metadata.get("recall") if isinstance(metadata.get("recall"), dict) else {}
    fields = {f.name for f in dataclasses.fields(RecallTask)}
    return RecallTask(**{k: v for k, v in trained.items() if k in fields and isinstance(v, int)})


@dataclass(frozen=True)
class RecallRow:
    """Exact-match accuracy on the queried values at one threshold setting (as :class:`EvalRow` for text)."""

    threshold: float | list[float]
    thresholds: list[float]
    context: int
    accuracy: float  # values right, all bytes, over values asked
    byte_accuracy: float
    kv_fraction: float
    kv_fraction_per_layer: list[float]
    values: int

    def to_dict(self) -> dict:
        return {"task": "recall", **{k: getattr(self, k) for k in self.__dataclass_fields__}}


def _batches(task: RecallTask, text: bytes, sequences: int, seed: int, batch_size: int) -> list[RecallBatch]:
    gen = torch.Generator().manual_seed(seed)
    text = clean_text(text)
    return [make_batch(task, text, min(batch_size, sequences - s), gen) for s in range(0, sequences, batch_size)]


@torch.no_grad()
def evaluate_recall(model: HAMLM, task: RecallTask, text: bytes,
                    thresholds: Sequence[float | Sequence[float] | None] = (None,), sequences: int = 256,
                    seed: int = 1234, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> list[RecallRow]:
    """Accuracy of ``model`` on ``sequences`` sequences of the task (the same ones at every threshold setting: the
    model's own (None), one value for every layer, or one per layer)."""
    was_training = model.training
    model.eval()
    batches = _batches(task, text, sequences, seed, batch_size)
    rows = []
    for threshold in thresholds:
        tau = model.thresholds(threshold)
        right = values = right_bytes = n_bytes = 0
        routed = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
        for batch in batches:
            logits, routes = model(batch.tokens, tau)
            scored = batch.targets != IGNORE
            hit = (logits.argmax(-1) == batch.targets) & scored
            right_bytes += int(hit.sum())
            n_bytes += int(scored.sum())
            # each value is value_len consecutive scored positions: right when all its bytes are
            per_value = hit[scored].view(-1, task.value_len).all(dim=1)
            right += int(per_value.sum())
            values += per_value.numel()
            routed += torch.tensor([float(info.routed.sum()) for info in routes], dtype=torch.float64)
            if progress is not None:
                progress(batch.tokens.shape[0])
        per_layer = (routed / (sequences * task.context)).tolist()
        asked = tau.tolist()
        shown = float(threshold) if isinstance(threshold, (int, float)) else asked
        rows.append(RecallRow(shown, asked, task.context, right / values, right_bytes / n_bytes,
                              sum(per_layer) / len(per_layer), per_layer, values))
    model.train(was_training)
    return rows


@torch.no_grad()
def thresholds_for_fractions(model: HAMLM, task: RecallTask, text: bytes, fractions: Sequence[float],
                             sequences: int = 256, seed: int = 1234, batch_size: int = 16) -> list[list[float]]:
    """Per fraction, one threshold per layer that routes about that fraction of the task's tokens in each layer: the
    quantile of the layer's router scores with every token routed (tau = -1). Layer 0's scores do not depend on the
    routes, so its fraction is exact up to ties; a later layer's scores move a little with the routes below it, so
    :func:`evaluate_recall` reports the fraction actually routed. Fraction 1 gives -1 and 0 gives 3 (every score lies
    in [0, 2])."""
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise InputError(f"recall: a cached fraction must lie in [0, 1], got {f}")
    was_training = model.training
    model.eval()
    everything = model.thresholds(-1.0)
    scores = [[] for _ in range(model.cfg.n_layers)]
    for batch in _batches(task, text, sequences, seed, batch_size):
        _, routes = model(batch.tokens, everything)
        for layer, info in enumerate(routes):
            scores[layer].append(info.score.flatten().double())
    model.train(was_training)
    per_layer = [torch.cat(s) for s in scores]
    out = []
    for f in fractions:
        if f >= 1.0:
            out.append([-1.0] * model.cfg.n_layers)
        elif f <= 0.0:
            out.append([3.0] * model.cfg.n_layers)
        else:
            out.append([float(torch.quantile(s, 1.0 - f)) for s in per_layer])
    return out
