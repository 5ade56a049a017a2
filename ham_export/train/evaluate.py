"""Held-out bits per byte and cached fraction of a HAM model at given thresholds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.data import windows
from ..core.model import HAMLM


@dataclass(frozen=True)
class EvalRow:
    """The result at one threshold setting.

    threshold: the global value asked for, or the per-layer list when the model's own thresholds were used.
    kv_fraction: cached tokens over all tokens, all layers together; kv_fraction_per_layer: the same per layer.
    """

    threshold: float | list[float]
    thresholds: list[float]
    bits_per_byte: float
    kv_fraction: float
    kv_fraction_per_layer: list[float]
    tokens: int

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "thresholds": self.thresholds,
            "bits_per_byte": self.bits_per_byte,
            "kv_fraction": self.kv_fraction,
            "kv_fraction_per_layer": self.kv_fraction_per_layer,
            "tokens": self.tokens,
        }


@torch.no_grad()
def evaluate(model: HAMLM, data: bytes, thresholds: Sequence[float | None] = (None,), window: int | None = None,
             batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[EvalRow]:
    """Bits per byte of ``data`` at each threshold (None = the model's own), in non-overlapping windows.

    Each window of ``window`` bytes (default: the model's training context) starts from an empty state, so the
    figure is the mean over positions 0..window-1 of a fresh context. ``progress`` is called with the number of
    windows done after each batch.
    """
    was_training = model.training
    model.eval()
    window = window or model.cfg.context_length
    chunks = windows(data, window)
    rows = []
    for threshold in thresholds:
        tau = model.thresholds(threshold)
        nll, count = 0.0, 0
        routed = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
        for start in range(0, chunks.shape[0], batch_size):
            batch = chunks[start: start + batch_size]
            inputs, targets = batch[:, :-1].clamp_min(0), batch[:, 1:]
            valid = batch[:, :-1] >= 0
            logits, routes = model(inputs, tau)
            nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum"))
            count += int((targets >= 0).sum())
            routed += torch.tensor([float((info.routed & valid).sum()) for info in routes], dtype=torch.float64)
            if progress is not None:
                progress(batch.shape[0])
        positions = int((chunks[:, :-1] >= 0).sum())
        per_layer = (routed / positions).tolist()
        asked = list(model.cfg.thresholds) if threshold is None else [float(threshold)] * model.cfg.n_layers
        rows.append(EvalRow(
            threshold=asked if threshold is None else float(threshold),
            thresholds=asked,
            bits_per_byte=nll / count / math.log(2),
            kv_fraction=sum(per_layer) / len(per_layer),
            kv_fraction_per_layer=per_layer,
            tokens=count,
        ))
    model.train(was_training)
    return rows
