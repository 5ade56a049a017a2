"""Training of HAM language models, with the threshold control loop of the paper's Algorithm 2.

The threshold is not trained by the loss. After a warm-up with tau frozen, each step moves every layer's tau toward
a target cached fraction: tau_l <- tau_l + eta * (f_actual_l - f_target), so a layer that caches too much raises its
threshold. With ``f_target=None`` the thresholds stay fixed (the baselines: tau = -1 caches every token, a
Transformer-like model; tau = 3 caches none, a pure GDN). The learned router, when configured, gets its gradient
through a straight-through estimator in :meth:`HAMLayer.forward`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core import checkpoint
from ..core.config import HAMConfig
from ..core.model import HAMLM, cached_fraction
from .evaluate import evaluate

Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (batch, gen) -> inputs, targets


def text_sampler(data: bytes, seq_len: int) -> Sampler:
    """Random windows of ``seq_len + 1`` bytes: predict every byte from the bytes before it."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)

    def sample(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s: s + seq_len + 1] for s in starts.tolist()])
        return batch[:, :-1], batch[:, 1:]

    return sample


def text_validation(data: bytes) -> Callable[[HAMLM], dict[str, Any]]:
    """The figures logged at each evaluation of a text model: held-out bits per byte and cached fraction."""

    def validate(model: HAMLM) -> dict[str, Any]:
        row = evaluate(model, data)[0]
        return {"val_bpb": round(row.bits_per_byte, 4), "val_kv_fraction": round(row.kv_fraction, 4)}

    return validate


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    f_target: float | None = 0.5
    tau_init: float = 0.5
    tau_eta: float = 0.01
    tau_warmup_steps: int = 100
    eval_every: int = 200
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def update_thresholds(thresholds: tuple[float, ...], fractions: list[float], f_target: float,
                      eta: float) -> tuple[float, ...]:
    """One step of the control loop: tau_l + eta * (f_actual_l - f_target)."""
    return tuple(t + eta * (f - f_target) for t, f in zip(thresholds, fractions, strict=True))


def _param_groups(model: HAMLM, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "conv_weight" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model_cfg: HAMConfig, train_cfg: TrainConfig, train_data: bytes, val_data: bytes,
          log: Callable[[dict[str, Any]], None] = lambda row: None,
          progress: Callable[[int, dict[str, float]], None] | None = None, sampler: Sampler | None = None,
          validate: Callable[[HAMLM], dict[str, Any]] | None = None) -> tuple[HAMLM, dict[str, Any]]:
    """Train a HAM model; returns the model (thresholds calibrated in its config) and the training metadata.

    ``log`` receives one dict per logged event (evaluations and the final summary); ``progress`` is called after
    every step with the step number and its figures. By default the model learns to predict every byte of random
    windows of ``train_data`` and is evaluated in bits per byte on ``val_data``; ``sampler`` gives other batches
    (targets -100 are not scored: :mod:`.recall`) and ``validate`` other figures.
    """
    sampler = sampler or text_sampler(train_data, train_cfg.seq_len)
    validate = validate or text_validation(val_data)
    torch.manual_seed(train_cfg.seed)
    cfg = model_cfg.with_thresholds((train_cfg.tau_init,) * model_cfg.n_layers)
    model = HAMLM(cfg, seed=train_cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                                  betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(train_cfg.seed)
    start_time = time.monotonic()
    for step in range(train_cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = train_cfg.lr_at(step)
        inputs, targets = sampler(train_cfg.batch_size, gen)
        logits, routes = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip))
        optimizer.step()
        fractions = cached_fraction(routes)
        if train_cfg.f_target is not None and step >= train_cfg.tau_warmup_steps:
            model.cfg = model.cfg.with_thresholds(
                update_thresholds(model.cfg.thresholds, fractions, train_cfg.f_target, train_cfg.tau_eta))
        loss_value = float(loss.detach())
        figures = {"loss": loss_value, "bpb": loss_value / math.log(2), "grad_norm": grad_norm,
                   "kv_fraction": sum(fractions) / len(fractions)}
        if progress is not None:
            progress(step + 1, figures)
        last = step + 1 == train_cfg.steps
        if (step + 1) % train_cfg.eval_every == 0 or last:
            log({"step": step + 1, "elapsed_s": round(time.monotonic() - start_time, 1),
                 "train_bpb": round(figures["bpb"], 4), **validate(model),
                 "thresholds": [round(t, 4) for t in model.cfg.thresholds]})
    model.eval()
    metadata = {
        "train": {k: v for k, v in dataclasses.asdict(train_cfg).items()},
        "train_seconds": round(time.monotonic() - start_time, 1),
        "train_bytes": len(train_data),
        "parameters": model.num_parameters(),
        "torch": str(torch.__version__),
    }
    return model, metadata


def write_run(model: HAMLM, metadata: dict[str, Any], out: Path,
              log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Save a trained model as ``out`` (.pt) and as ``<stem>.safetensors/`` beside it, log the run's last row (where
    it went, its time and thresholds) and return the summary a training script prints."""
    checkpoint.save_pt(model, out, metadata)
    checkpoint.save_safetensors(model, out.with_suffix(""), metadata)
    if log is not None:
        log({"done": str(out), "train_seconds": metadata["train_seconds"], "thresholds": list(model.cfg.thresholds)})
    return {"checkpoint": str(out), "train_seconds": metadata["train_seconds"]}


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True)


@contextmanager
def run_log(out: Path, steps: int, figure: str) -> Iterator[tuple[Callable[[dict[str, Any]], None],
                                                              Callable[[int, dict[str, float]], None]]]:
    """A training script's console and log: yields ``log`` (a row to ``<out>.log.jsonl`` and the console) and
    ``progress`` (for :func:`train`: a bar showing ``figure`` and the cached fraction)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    log_path = out.with_suffix(".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}")) as bar:
        task = bar.add_task(f"training {out.name}", total=steps, figures="")

        def log(row: dict[str, Any]) -> None:
            log_file.write(json_line(row) + "\n")
            log_file.flush()
            bar.console.print(json_line(row))

        def progress(step: int, figures: dict[str, float]) -> None:
            bar.update(task, completed=step,
                       figures=f"{figure} {figures[figure]:.3f}  kv {figures['kv_fraction']:.2f}")

        yield log, progress
