"""The memory report of ``ham-export memory``: per threshold, the measured cache fill extrapolated to a context,
the bytes it needs, the quality it gives; against a budget, the threshold and capacity to build with; and the
quality cost of a budget-safe cache (fixed capacity, ``evict`` policy) against the plain threshold.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.model import HAMLM
from ..errors import InputError
from . import fill as fl
from . import sizes as mem
from .units import format_size

SWEEP = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
DEFAULT_WINDOW = 2048  # 4 windows of 2 KiB: a 4x extrapolation to 8192 within the one-minute budget of a sweep
DEFAULT_DOCS = 4
EXTRAPOLATION = ("per document and layer, the cumulative count of cached tokens (chunked prefill, explicit state) "
                 "over positions W/8..W of a window of W bytes is fitted with count(t) = a * t^b in log-log space "
                 "(b in [0, 1], anchored at the count at W) and evaluated at the context (the measured count when "
                 f"W >= context); capacity = {fl.SAFETY:g} x the largest prediction over documents and layers")


@dataclass
class MemoryRow:
    """One threshold: its fill at the context, its memory and its quality."""

    threshold: float | list[float]
    fill: fl.FillPrediction
    fill_window: list[float]
    memory: mem.MemoryEstimate
    bits_per_byte: float
    delta_bits_per_byte: float
    fits: bool | None = None
    recall_accuracy: float | None = None  # on the recall task's documents (``memory --task recall``)

    @property
    def label(self) -> str:
        return (f"{self.threshold:g}" if isinstance(self.threshold, float)
                else "own: " + ",".join(f"{t:.2f}" for t in self.threshold))

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "threshold": self.threshold,
            "kv_fraction": self.fill.fraction,
            "kv_fraction_per_layer": self.fill.fraction_per_layer,
            "kv_fraction_spread": self.fill.spread(),
            "kv_fraction_in_window": sum(self.fill_window) / len(self.fill_window),
            "capacity": m.capacity,
            "kv_bytes": m.kv_bytes,
            "kv_expected_bytes": m.kv_expected_bytes,
            "state_bytes": m.state_bytes,
            "weights_bytes": m.weights_bytes,
            "workspace_bytes": m.workspace_bytes,
            "total_bytes": m.total_bytes,
            "bits_per_byte": self.bits_per_byte,
            "delta_bits_per_byte": self.delta_bits_per_byte,
            "recall_accuracy": self.recall_accuracy,
            "fits": self.fits,
            "per_layer": [layer.to_dict() for layer in m.per_layer],
        }


@dataclass
class BudgetChoice:
    """Against a budget: the thresholds that fit, the best-quality one, its capacity and the margin left. When none
    fits, ``safe_capacity`` is the largest capacity that does (a fixed cache under the evict policy), 0 if none."""

    budget: int
    fitting: list[float | list[float]]
    best: MemoryRow | None
    safe_capacity: int

    @property
    def margin(self) -> int | None:
        return None if self.best is None else self.budget - self.best.memory.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "fitting_thresholds": self.fitting,
                "threshold": None if self.best is None else self.best.threshold,
                "capacity": self.best.memory.capacity if self.best else self.safe_capacity,
                "policy": "drop" if self.best else "evict",
                "total_bytes": None if self.best is None else self.best.memory.total_bytes,
                "margin_bytes": self.margin, "fits": self.best is not None}


@dataclass
class MemoryReport:
    model: str
    data: str
    context: int
    batch: int
    dtype: str
    window: int
    documents: int
    rows: list[MemoryRow]
    own: MemoryRow
    extrapolation_check: dict[str, float]
    budget: BudgetChoice | None = None
    policy_comparison: dict[str, Any] | None = None
    verification: list[dict[str, Any]] | None = None
    engine: dict[str, Any] | None = None  # a TensorRT artifact's device memory (ham_export.memory.engine)
    backends: dict[str, str] = field(default_factory=dict)
    fill_runner: str = "eager"  # what ran the fill measurement: eager PyTorch, or ONNX Runtime (fill.fast_runner)
    task: dict[str, Any] | None = None  # the recall task the documents are, or None: text

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "data": self.data, "context": self.context, "batch": self.batch,
            "dtype": self.dtype, "window": self.window, "documents": self.documents,
            "extrapolation": EXTRAPOLATION, "extrapolation_check": self.extrapolation_check,
            "model_thresholds": self.own.threshold, "model_bits_per_byte": self.own.bits_per_byte,
            "task": self.task or {"name": "text"},
            "rows": [row.to_dict() for row in self.rows],
            "budget": None if self.budget is None else self.budget.to_dict(),
            "policy_comparison": self.policy_comparison,
            "verification": self.verification,
            "engine": self.engine,
            "backends": self.backends,
            "fill_runner": self.fill_runner,
        }


def parse_thresholds(text: str) -> list[float]:
    """``"0.3,0.5,0.8"`` -> [0.3, 0.5, 0.8]; refuses empty, non-numeric and non-finite values."""
    import math

    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--thresholds must be numbers separated by commas, got {part.strip()!r}") from None
        if not math.isfinite(value):
            raise InputError(f"--thresholds must be finite numbers, got {part.strip()!r}")
        values.append(value)
    return values


def memory_report(model: HAMLM, data: bytes, context: int, batch: int = 1, dtype: str = "fp32",
                  thresholds: Sequence[float] = SWEEP, budget: int | None = None, window: int = DEFAULT_WINDOW,
                  max_docs: int = DEFAULT_DOCS, model_name: str = "", data_name: str = "",
                  progress: Callable[[int], None] | None = None, fast: bool = True,
                  recall: tuple[Any, fl.Answers, dict[str, Any]] | None = None) -> MemoryReport:
    """Measure the fill and quality at each threshold (and the model's own), model the memory at ``context``, and
    choose against ``budget``. ``progress`` is called with the documents done.

    ``recall``: (documents [D, W + 1], their answers, the task's description) of the recall task
    (:func:`ham_export.train.recall.recall_documents`) measured instead of ``data``'s windows; quality is then recall
    accuracy, and the budget's choice the most accurate threshold that fits (else: the lowest bits per byte)."""
    if context < 1 or batch < 1:
        raise InputError(f"need context >= 1 and batch >= 1, got context={context}, batch={batch}")
    if dtype not in mem.DTYPES:
        raise InputError(f"dtype must be one of {', '.join(mem.DTYPES)}, got {dtype!r}")
    cfg, n_params = model.cfg, model.num_parameters()
    window = min(window, context)
    if budget is not None:
        floor = mem.estimate(cfg, n_params, batch, 1, dtype).total_bytes
        if budget < floor:
            fixed = mem.estimate(cfg, n_params, batch, 0, dtype)
            raise InputError(
                f"budget {format_size(budget)} ({budget:,} B) is below the memory of a one-entry cache, "
                f"{format_size(floor)}: weights {format_size(fixed.weights_bytes)} + fixed state "
                f"{format_size(fixed.state_bytes)} for batch {batch} in {dtype} + the cache and workspace; "
                f"no threshold or capacity can fit it")
    docs, answers, task = (fl.documents(data, window, max_docs), None, None) if recall is None else recall
    runner = fl.fast_runner(model, docs.shape[1] - 1) if fast else None
    try:
        runs = fl.measure_fill(model, docs, [None, *thresholds], progress=progress, runner=runner, answers=answers)
    finally:
        if runner is not None:
            runner.close()
    own_bpb = runs[0].bits_per_byte

    def row(run: fl.FillRun) -> MemoryRow:
        prediction = fl.predict_fill(run, context)
        memory = mem.estimate(cfg, n_params, batch, prediction.capacity, dtype, prediction.expected_per_layer)
        return MemoryRow(run.threshold, prediction, run.fraction_per_layer(), memory, run.bits_per_byte,
                         run.bits_per_byte - own_bpb, recall_accuracy=run.recall_accuracy)

    rows = [row(run) for run in runs[1:]]
    report = MemoryReport(model_name, data_name, context, batch, dtype, docs.shape[1] - 1, docs.shape[0], rows,
                          row(runs[0]), fl.extrapolation_check(runs[0].counts), backends=backend_notes(),
                          fill_runner="eager" if runner is None else "onnxruntime (custom ops)",
                          task=task)
    if budget is not None:
        for r in [*rows, report.own]:
            r.fits = r.memory.total_bytes <= budget
        fitting = [r for r in rows if r.fits]
        if task is None:
            best = min(fitting, key=lambda r: r.bits_per_byte) if fitting else None
        else:  # the most accurate; among equals, the least memory
            best = max(fitting, key=lambda r: (r.recall_accuracy, -r.memory.total_bytes)) if fitting else None
        safe = mem.largest_capacity(cfg, n_params, batch, dtype, budget, context)
        report.budget = BudgetChoice(budget, [r.threshold for r in fitting], best, safe)
        capacity = best.memory.capacity if best else safe
        report.policy_comparison = compare_policies(model, docs, context, capacity,
                                                    best.threshold if best else None, answers)
    return report


def backend_notes() -> dict[str, str]:
    """Per registered backend, what the memory model covers of it, and whether it can run here."""
    from ..backends import registry

    notes = {}
    for name, backend in registry().items():
        reason = backend.requires()
        notes[name] = backend.memory + ("" if reason is None else f" (cannot run here: {reason})")
    return notes


def compare_policies(model: HAMLM, docs, context: int, capacity: int,
                     threshold: float | list[float] | None, answers: fl.Answers | None = None) -> dict[str, Any]:
    """The quality of a cache of ``capacity`` entries at ``context`` three ways: the plain ``threshold`` whose
    predicted fill it is (a growing cache, no overflow), and the model's own thresholds with that capacity under
    ``evict`` and under ``drop``. Measured on the documents (W bytes each) with chunked prefill
    (``fill.POLICY_CHUNK`` tokens a call); when W < context the capacity is scaled to the same share of the
    sequence, round(capacity * W / context). With ``answers`` (recall documents) each also gives recall accuracy."""
    w = docs.shape[1] - 1
    scaled = max(1, round(capacity * w / context)) if context > w else capacity
    result: dict[str, Any] = {"capacity": capacity, "window": w, "capacity_in_window": scaled,
                              "documents": docs.shape[0], "decode": f"prefill, {fl.POLICY_CHUNK} tokens a call"}
    if threshold is not None:
        result["threshold"] = {"threshold": threshold,
                               **fl.policy_quality(model, docs, threshold, None, "drop", answers=answers)}
    for policy in ("evict", "drop"):
        result[policy] = {"threshold": list(model.cfg.thresholds),
                          **fl.policy_quality(model, docs, None, scaled, policy, answers=answers)}
    if threshold is not None:
        result["evict_cost_bits_per_byte"] = result["evict"]["bits_per_byte"] - result["threshold"]["bits_per_byte"]
        if answers is not None:
            result["evict_cost_recall_accuracy"] = (result["evict"]["recall_accuracy"]
                                                    - result["threshold"]["recall_accuracy"])
    return result


def plot_report(report: MemoryReport, path: str | Path) -> Path:
    """A PNG of total and KV memory (left axis) and quality (right axis: bits per byte, or recall accuracy) against
    threshold, with the budget."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'ham-export[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in report.rows if isinstance(r.threshold, float)), key=lambda r: r.threshold)
    if not rows:
        raise InputError("--plot needs at least one global threshold")
    mib = float(1 << 20)
    x = [r.threshold for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    ax.plot(x, [r.memory.total_bytes / mib for r in rows], "o-", color="tab:blue", label="total")
    ax.plot(x, [r.memory.kv_bytes / mib for r in rows], "s--", color="tab:cyan", label="KV cache (capacity)")
    ax.plot(x, [(r.memory.weights_bytes + r.memory.state_bytes) / mib for r in rows], ":", color="tab:gray",
            label="weights + fixed state")
    if report.budget is not None:
        ax.axhline(report.budget.budget / mib, color="tab:red", label=f"budget {format_size(report.budget.budget)}")
        if report.budget.best is not None:
            ax.axvline(report.budget.best.threshold, color="tab:green", alpha=0.5,
                       label=f"chosen tau={report.budget.best.label}")
    ax.set_yscale("log")
    ax.set_xlabel("threshold tau (all layers)")
    ax.set_ylabel(f"MiB (batch {report.batch}, {report.dtype}, context {report.context})")
    quality = ax.twinx()
    if report.task is None:
        measure, name, better = (lambda r: r.bits_per_byte), "bits per byte", "lower"
    else:
        measure, name, better = (lambda r: r.recall_accuracy), "recall accuracy", "higher"
    quality.plot(x, [measure(r) for r in rows], "^-", color="tab:orange", label=name)
    quality.axhline(measure(report.own), color="tab:orange", alpha=0.4, ls="--", label=f"{name}, own thresholds")
    quality.set_ylabel(f"{name} ({better} is better)")
    lines = ax.get_legend_handles_labels()
    more = quality.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center left")
    ax.set_title(f"{Path(report.model).name}: memory and quality against threshold")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure to ``path`` (its format from the suffix, default PNG) whole or not at all, and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")  # then renamed: a reader never sees half a PNG
    try:
        fig.savefig(partial, format=path.suffix.lstrip(".") or "png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(fig)
    return path
