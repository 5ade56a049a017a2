"""Measured cache fill: how many tokens each layer routes into its KV cache on real text, and how that grows.

The model runs over documents (non-overlapping windows of ``window`` bytes, spread evenly over the text) at a
threshold, in its prefill form ``CHUNK`` tokens at a time with an explicit, growing state (memory O(W x cached),
not the parallel form's O(W^2), so windows can be as long as the context).
For each document and layer it records the cumulative count of cached tokens at every position, and the
bits per byte of the same pass. The count is then extrapolated to the requested context length per document, with a
power law ``count(t) = a * t**b`` fitted in log-log space over positions ``window/8..window`` and anchored at the
count at ``window`` (``b`` clamped to [0, 1]: a cache never grows faster than the sequence). The spread over
documents is kept, not averaged away. :func:`extrapolation_check` measures how well this works on the data
itself: fit on the first half of each window, predict the count at its end.

:func:`policy_quality` measures the bits per byte of a fixed-capacity cache under an overflow policy (``drop`` or
``evict``) with the chunked prefill form (small chunks). The capacity to build with is ``SAFETY`` x the largest
predicted count over documents and layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.model import HAMLM, LayerState
from ..errors import InputError

FIT_START = 8  # the fit uses positions from window / FIT_START on: the first tokens of a document route unusually
MIN_WINDOW = 16
CHUNK = 512  # tokens per prefill call in the fill measurement
SAFETY = 1.25  # capacity = SAFETY x the largest predicted count over documents and layers


def documents(data: bytes, window: int, max_docs: int) -> torch.Tensor:
    """Up to ``max_docs`` whole windows of ``window + 1`` bytes (inputs and targets), evenly spread over ``data``:
    [D, window + 1] int64. Refuses data shorter than one window."""
    if window < MIN_WINDOW:
        raise InputError(f"the fill window must be at least {MIN_WINDOW} bytes, got {window}")
    if max_docs < 1:
        raise InputError(f"need at least 1 document, got {max_docs}")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    available = (tokens.numel() - 1) // window
    if available < 1:
        raise InputError(f"the data holds {tokens.numel()} bytes; a fill window of {window} needs at least "
                         f"{window + 1} (give a longer file or a smaller window)")
    picks = torch.linspace(0, available - 1, min(available, max_docs)).round().long().unique()
    return torch.stack([tokens[i * window: i * window + window + 1] for i in picks.tolist()])


@dataclass
class FillRun:
    """One threshold setting over the documents.

    threshold: the value asked for (float), or the per-layer list when the model's own thresholds were used;
    counts: [D, L, W] float64 cumulative cached tokens of document d, layer l, after position t (t = 1..W);
    bits_per_byte: over all documents' predicted bytes.
    """

    threshold: float | list[float]
    thresholds: list[float]
    counts: torch.Tensor
    bits_per_byte: float
    recall_accuracy: float | None = None  # documents of the recall task: exact-match accuracy on their values

    @property
    def window(self) -> int:
        return self.counts.shape[-1]

    def fraction_per_layer(self) -> list[float]:
        """Cached fraction over the whole window, per layer (mean over documents)."""
        return (self.counts[..., -1] / self.window).mean(0).tolist()


@dataclass(frozen=True)
class Answers:
    """What recall documents ask: ``targets`` [D, W] the byte to predict at each position (negative where nothing is
    asked), in values of ``value_len`` consecutive positions."""

    targets: torch.Tensor
    value_len: int

    def accuracy(self, predictions: torch.Tensor) -> float:
        """Exact-match accuracy of ``predictions`` [D, W] (argmax bytes): a value is right when all its bytes are."""
        asked = self.targets >= 0
        hit = (predictions == self.targets)[asked].view(-1, self.value_len).all(dim=1)
        return float(hit.double().mean()) if hit.numel() else 0.0


def _grow(state: list[LayerState], capacity: int) -> list[LayerState]:
    """The same state with room for ``capacity`` cache entries (zero padding past the old capacity)."""
    def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = capacity - shape[dim]
        return torch.cat([x, x.new_zeros(shape)], dim)
    return [LayerState(s.ssm, s.conv, pad(s.k_cache, 2), pad(s.v_cache, 2), pad(s.score_cache, 1), s.length)
            for s in state]


def fast_runner(model: HAMLM, window: int):
    """An opened ONNX Runtime runner (custom ops) of ``model`` with a cache of ``window`` entries, for
    :func:`measure_fill`: its prefill is many times faster than eager PyTorch's on a CPU. Exported once per model
    and window into ``$XDG_CACHE_HOME/ham-export/fill/`` (default ``~/.cache``) and reused. None where ONNX
    Runtime or the op library is missing, or the export fails: the caller measures with the eager model."""
    import logging
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from ..backends import load_runner, registry
    from ..backends.onnxruntime import custom_ops_missing
    from ..core.checkpoint import weights_sha256

    log = logging.getLogger(__name__)
    missing = custom_ops_missing()
    if missing is not None:
        log.info("measuring the fill with the eager model: %s", missing)
        return None
    backend = registry()["onnxruntime"]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ham-export" / "fill"
    folder = cache / f"{weights_sha256(model)[:24]}-w{window}"
    try:
        if not (folder / "prefill.onnx").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
            try:
                backend.build(model, staging / "artifact", capacity=window, policy="drop", ops="custom")
                os.replace(staging / "artifact", folder)  # whole or not at all; a concurrent twin is as good
            except OSError:
                if not (folder / "prefill.onnx").is_file():
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return load_runner(folder).open()
    except Exception as exc:
        log.warning("measuring the fill with the eager model: the ONNX Runtime runner is unavailable (%s)", exc)
        return None


@torch.no_grad()
def measure_fill(model: HAMLM, docs: torch.Tensor, thresholds: Sequence[float | None], batch_size: int = 8,
                 progress: Callable[[int], None] | None = None, chunk: int = CHUNK, runner=None,
                 answers: Answers | None = None) -> list[FillRun]:
    """Run the prefill form over ``docs`` [D, W + 1] at each threshold (None: the model's own), ``chunk`` tokens
    at a time with an explicit state, so that memory is O(W * cached) rather than the parallel form's O(W^2).

    The cache starts at ``chunk`` entries and grows (zero padding) before any chunk that could overflow it, so no
    routed token is ever dropped (policy ``error``): the counts are exactly those of the parallel form.

    ``runner``: an opened runner of the same model whose cache holds the whole window (:func:`fast_runner`): one
    prefill per batch of documents, its routes and logits instead of the eager model's (the same up to rounding:
    a score within rounding of a threshold may route otherwise).

    ``answers``: the documents are recall sequences; each run also gives the exact-match accuracy on their values."""
    if runner is None:
        def prefill(inputs: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _eager_prefill(model, inputs, tau, chunk)
    else:
        if runner.capacity < docs.shape[1] - 1:
            raise InputError(f"the fill runner's cache ({runner.capacity}) is shorter than the window "
                             f"({docs.shape[1] - 1})")

        def prefill(inputs: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = runner.prefill(inputs, tau.cpu())[0].cpu()
            return out.logits.float(), out.routed.transpose(0, 1)
    was_training = model.training
    model.eval()
    runs = []
    for threshold in thresholds:
        tau = model.thresholds(threshold)
        counts, predictions, nll = [], [], 0.0
        for start in range(0, docs.shape[0], batch_size):
            batch = docs[start: start + batch_size]
            logits, routed = prefill(batch[:, :-1], tau)
            nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            counts.append(routed.to(torch.float64).cumsum(-1))
            if answers is not None:
                predictions.append(logits.argmax(-1))
            if progress is not None:
                progress(batch.shape[0])
        asked = [float(t) for t in tau.tolist()]
        runs.append(FillRun(asked if threshold is None else float(threshold), asked, torch.cat(counts),
                            nll / (docs.shape[0] * (docs.shape[1] - 1)) / math.log(2),
                            None if answers is None else answers.accuracy(torch.cat(predictions))))
    model.train(was_training)
    return runs


def _eager_prefill(model: HAMLM, inputs: torch.Tensor, tau: torch.Tensor, chunk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager model's logits [B, W, V] and routes [B, L, W] over whole windows, ``chunk`` tokens at a time (see
    :func:`measure_fill`)."""
    state = model.init_state(inputs.shape[0], min(chunk, inputs.shape[1]))
    logits, routed = [], []
    for lo in range(0, inputs.shape[1], chunk):
        piece = inputs[:, lo: lo + chunk]
        need = int(max(int(s.length.max()) for s in state)) + piece.shape[1]
        if need > state[0].k_cache.shape[2]:
            state = _grow(state, max(need, 2 * state[0].k_cache.shape[2]))
        out, state, routes = model.prefill(piece, state, tau, policy="error")
        logits.append(out)
        routed.append(torch.stack([r.routed for r in routes], dim=1))
    return torch.cat(logits, 1), torch.cat(routed, -1)


def _fit_power_law(counts: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares of log count = log a + b log t over positions lo..hi (1-based) where count > 0.

    counts [..., W] -> (log_a, b) [...]; b clamped to [0, 1]. Where every count is 0, b = 0 and a = 0."""
    t = torch.arange(lo, hi + 1, dtype=torch.float64)
    y = counts[..., lo - 1: hi]
    positive = y > 0
    x = torch.where(positive, t.log().expand_as(y), torch.zeros_like(y))
    ly = torch.where(positive, y.clamp_min(1e-300).log(), torch.zeros_like(y))
    n = positive.sum(-1).to(torch.float64)
    sx, sy = x.sum(-1), ly.sum(-1)
    sxx, sxy = (x * x).sum(-1), (x * ly).sum(-1)
    denom = n * sxx - sx * sx
    b = torch.where(denom > 0, (n * sxy - sx * sy) / denom.clamp_min(1e-300), torch.ones_like(n))
    b = b.clamp(0.0, 1.0)
    # Anchor the curve at the last observed count (the best-measured point), with the fitted slope.
    last = y[..., -1]
    log_a = torch.where(last > 0, last.clamp_min(1e-300).log() - b * math.log(hi), torch.full_like(b, -math.inf))
    return log_a, b


def extrapolate_counts(counts: torch.Tensor, context: int) -> torch.Tensor:
    """Cached entries at position ``context`` per document and layer: counts [D, L, W] -> [D, L] float64.

    Within the window, the measured count; beyond it, the power law of :func:`_fit_power_law` over positions
    W/8..W, anchored at the count at W and capped at ``context``."""
    w = counts.shape[-1]
    if context <= w:
        return counts[..., context - 1]
    log_a, b = _fit_power_law(counts, max(1, w // FIT_START), w)
    return (log_a + b * math.log(context)).exp().clamp(max=float(context))


def extrapolation_check(counts: torch.Tensor) -> dict[str, float]:
    """Fit on the first half of each window, predict the cached fraction at its end, compare with the measured one:
    mean and max absolute error of the fraction over documents and layers, and the mean measured fraction."""
    w = counts.shape[-1]
    half = w // 2
    predicted = extrapolate_counts(counts[..., :half], w) / w
    measured = counts[..., -1] / w
    error = (predicted - measured).abs()
    return {"fit_window": half, "predict_at": w, "mean_abs_error": float(error.mean()),
            "max_abs_error": float(error.max()), "mean_fraction": float(measured.mean())}


@dataclass(frozen=True)
class FillPrediction:
    """The expected cache fill at ``context`` for one threshold.

    entries: [D, L] predicted cached entries per document and layer; expected_per_layer: mean over documents;
    capacity: the cache capacity to build with: SAFETY (1.25) x the largest prediction over documents and layers,
    rounded up, in [1, context].
    """

    context: int
    entries: torch.Tensor

    @property
    def expected_per_layer(self) -> list[float]:
        return self.entries.mean(0).tolist()

    @property
    def fraction_per_layer(self) -> list[float]:
        return [e / self.context for e in self.expected_per_layer]

    @property
    def fraction(self) -> float:
        return float(self.entries.mean()) / self.context

    def spread(self) -> dict[str, float]:
        """Quantiles over documents of the cached fraction (mean over layers)."""
        per_doc = self.entries.mean(1) / self.context
        q = torch.quantile(per_doc, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
        return dict(zip(("min", "p10", "p50", "p90", "max"), q, strict=True))

    @property
    def capacity(self) -> int:
        return max(1, min(self.context, math.ceil(SAFETY * float(self.entries.max()) - 1e-9)))


def predict_fill(run: FillRun, context: int) -> FillPrediction:
    return FillPrediction(context, extrapolate_counts(run.counts, context))


POLICY_CHUNK = 64  # tokens per prefill call in policy_quality: a chunk's own routed tokens are seen beyond capacity


@torch.no_grad()
def policy_quality(model: HAMLM, docs: torch.Tensor, thresholds: float | list[float] | None, capacity: int | None,
                   policy: str, chunk: int = POLICY_CHUNK, answers: Answers | None = None) -> dict[str, float]:
    """Bits per byte of ``docs`` [D, W + 1] prefilled ``chunk`` tokens at a time with a cache of ``capacity``
    entries under ``policy`` (``drop``, ``evict``); ``capacity`` None: a cache that grows, nothing overflows.

    Within a chunk, attention sees the cache plus the chunk's routed tokens, so up to ``chunk`` tokens beyond the
    capacity (``chunk=1`` is a token-by-token decode). Returns bits_per_byte, the mean fill of the cache at the
    end (fraction of ``capacity``, or of the window when it grows) and the fraction of routed tokens that
    overflowed; with ``answers`` (recall documents) also recall_accuracy."""
    was_training = model.training
    model.eval()
    tau = model.thresholds(thresholds)
    inputs, targets = docs[:, :-1], docs[:, 1:]
    state = model.init_state(docs.shape[0], capacity if capacity is not None else chunk)
    nll, routed, overflow, predictions = 0.0, 0.0, 0.0, []
    for lo in range(0, inputs.shape[1], chunk):
        piece = inputs[:, lo: lo + chunk]
        if capacity is None:
            need = int(max(int(s.length.max()) for s in state)) + piece.shape[1]
            if need > state[0].k_cache.shape[2]:
                state = _grow(state, max(need, 2 * state[0].k_cache.shape[2]))
        logits, state, routes = model.prefill(piece, state, tau, "error" if capacity is None else policy)
        nll += float(F.cross_entropy(logits.flatten(0, 1), targets[:, lo: lo + chunk].flatten(), reduction="sum"))
        if answers is not None:
            predictions.append(logits.argmax(-1))
        routed += sum(float(r.routed.sum()) for r in routes)
        overflow += sum(float(r.overflow.sum()) for r in routes)
    model.train(was_training)
    fill = float(torch.stack([s.length for s in state]).double().mean()) / (capacity or inputs.shape[1])
    result = {"bits_per_byte": nll / targets.numel() / math.log(2), "fill": fill,
              "overflow_fraction": overflow / routed if routed else 0.0}
    if answers is not None:
        result["recall_accuracy"] = answers.accuracy(torch.cat(predictions, 1))
    return result
