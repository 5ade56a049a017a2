"""``ham-export bench``: prefill throughput and decode latency of artifacts, at a long context, against the first
configuration of the same run.

Decode: each configuration (artifact x cache fill x batch) starts from a state whose caches hold the entries real
text would leave at ``context`` (a fraction of it: the memory report's measured fill at a threshold, or a given
fraction), capped at the artifact's capacity, and runs decode steps at that threshold. The entries are random
(unit keys, normal values): a step's cost does not depend on their values. Configurations are measured interleaved,
``iterations`` steps each, in ``repeats`` rounds, so that a machine's drift affects all alike; each row gives the
median, p90 and p99 of the step times, the spread of the round medians, and its ratio to the first row.

The floor of a decode row: the step at the same batch with an empty cache (its fixed cost, measured in the same run
when a ``--fill 3`` row exists) plus the bytes its attention must read (keys and values of every cached entry of
every layer) at the machine's read bandwidth, measured in the same run: the faster of a NumPy sum (one thread) and a
torch sum (all its threads) over a 256 MiB array.

Prefill: the median time of a ``prompt``-byte prompt per batch, as tokens per second.

Memory: the bytes of the state each configuration holds (caches at capacity), and the process's peak resident
memory at the end (one process runs every configuration, so the peak is the largest's plus the runtime's).

A checkpoint among the artifacts (``model.pt``, ``model.safetensors`` or a folder holding one and no manifest) runs
as the eager model, the plain-PyTorch reference, with a cache for every token of the context: the baseline that
the compiled backends' speed-ups are measured against.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .backends import MANIFEST, Runner, load_runner
from .backends.programs import describe
from .core.config import HAMConfig
from .core.model import HAMLM
from .errors import InputError
from .memory import sizes as mem

NO_CACHE = 3.0  # a threshold above every score: nothing is cached (the pure-GDN step)
EVERY_TOKEN = -1.0  # below every score: every token is cached (the dense cost)


@dataclass(frozen=True)
class Fill:
    """How full the caches are at the context: ``label`` as given, the cached ``fraction`` of the context, and the
    thresholds the decode steps run at (None: the artifact's own)."""

    label: str
    fraction: float | None  # None: the artifact's own, per layer (:func:`own_fractions`)
    threshold: float | None


def parse_fill(text: str) -> Fill:
    """``own``: each artifact's own thresholds, with the fill real text gives them (every token for a layer whose
    threshold is below 0, none above 2, else the memory report's measured fill: that needs the checkpoint); a
    negative threshold (``-1``: every token cached, the dense cost); a threshold above 2 (``3``: none cached, pure
    GDN); a number in [0, 1]: that fraction of the context cached, decoding at the artifact's own thresholds."""
    text = text.strip()
    if text == "own":
        return Fill("own", None, None)
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--fill must be own, a threshold below 0 or above 2, or a fraction in [0, 1], got "
                         f"{text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"--fill {text!r} is not a finite number")
    if value < 0.0:
        return Fill(text, 1.0, value)
    if value > 2.0:
        return Fill(text, 0.0, value)
    if value <= 1.0:
        return Fill(text, value, None)
    raise InputError(f"--fill {text}: a number in (1, 2] is neither a fraction nor a threshold whose fill is known "
                     f"without text; measure its fill with `ham-export memory` and give the fraction")


def own_fractions(runner: Runner, measure: Callable[[Runner], list[float]] | None) -> list[float]:
    """The cached fraction of the context per layer at the artifact's own thresholds: 1 below 0, 0 above 2, else
    ``measure(runner)`` (the memory report's fill of the checkpoint)."""
    thresholds = list(runner.manifest.thresholds)
    known = [1.0 if t <= 0.0 else 0.0 if t > 2.0 else None for t in thresholds]
    if all(k is not None for k in known):
        return known
    if measure is None:
        raise InputError(f"--fill own: {runner.manifest.directory} routes on its text (thresholds "
                         f"{', '.join(f'{t:.3g}' for t in thresholds)}): give --model CHECKPOINT, its model, whose "
                         f"fill on held-out text is measured")
    measured = measure(runner)
    return [m if k is None else k for k, m in zip(known, measured, strict=True)]


def filled_state(runner: Runner, batch: int, entries: int | Sequence[int], seed: int = 0) -> list[torch.Tensor]:
    """A state (flat, :data:`~ham_export.backends.programs.STATE_FIELDS` order) whose caches hold ``entries``
    random entries (one count, or one per layer), shaped as the artifact's decode program takes it."""
    manifest = runner.manifest
    per_layer = [entries] * manifest.model.n_layers if isinstance(entries, int) else list(entries)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[manifest.dtype]
    gen = torch.Generator().manual_seed(seed)
    state = []
    for info in describe(manifest.model, manifest.capacity, manifest.dtype)["decode"]["inputs"][2:]:
        shape = [batch if d == "B" else d for d in info.shape]
        field_name = info.name.rsplit(".", 1)[-1]
        entries = per_layer[int(info.name.split(".")[1])]
        if field_name == "length":
            state.append(torch.full(shape, entries, dtype=torch.int64))
            continue
        value = torch.zeros(shape)
        if field_name in ("k_cache", "v_cache"):
            filled = torch.randn([*shape[:2], entries, shape[3]], generator=gen)
            if field_name == "k_cache":
                filled = filled / filled.norm(dim=-1, keepdim=True)
            value[:, :, :entries] = filled
        elif field_name == "score_cache":
            value[:, :entries] = torch.rand([shape[0], entries], generator=gen)
        elif field_name == "ssm":
            value = 0.1 * torch.randn(shape, generator=gen)
        state.append(value.to(dtype).contiguous())
    return runner.state_from_tensors(state)


def read_bandwidth(megabytes: int = 256, runs: int = 5) -> float:
    """The machine's read bandwidth in bytes per second: the best of ``runs`` sums over ``megabytes`` MiB of float32,
    with NumPy (one thread) and with torch (its intra-op threads, as a runtime's kernels read)."""
    import numpy as np

    array = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    tensor = torch.from_numpy(array)
    best = math.inf
    for total in (array.sum, tensor.sum):
        total()  # first touch
        for _ in range(runs):
            start = time.perf_counter()
            total()
            best = min(best, time.perf_counter() - start)
    return array.nbytes / best


@dataclass
class DecodeRow:
    artifact: str
    backend: str
    fill: str
    fraction: float  # of the context, mean over layers
    entries: int  # cached entries, mean over layers (capped at the capacity)
    batch: int
    context: int
    entries_per_layer: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list, repr=False)  # seconds per step
    round_medians: list[float] = field(default_factory=list, repr=False)
    threshold: float | list[float] | None = None  # the decode steps' threshold(s): the fill's, or the artifact's own
    state_bytes: int = 0
    read_bytes: int = 0  # keys and values the attention reads per step
    kv_bytes: int = 0  # the caches' buffers (keys, values, scores at capacity), from the memory model
    total_bytes: int = 0  # weights + state + caches + one step's workspace, from the memory model
    median_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    spread_ms: float = 0.0  # standard deviation of the round medians
    ratio: float = 1.0  # median over the first row's
    floor_ms: float | None = None
    of_floor: float | None = None  # median / floor
    command: str = ""

    def finish(self, baseline: DecodeRow | None) -> None:
        times = sorted(self.times)
        self.median_ms = 1e3 * statistics.median(times)
        self.p90_ms = 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))]
        self.p99_ms = 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))]
        medians = [1e3 * m for m in self.round_medians]
        self.spread_ms = statistics.pstdev(medians) if len(medians) > 1 else 0.0
        self.ratio = self.median_ms / baseline.median_ms if baseline is not None and baseline.median_ms else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["times"], data["round_medians"]
        return data


@dataclass
class PrefillRow:
    artifact: str
    backend: str
    batch: int
    prompt: int
    times: list[float] = field(default_factory=list, repr=False)
    median_ms: float = 0.0
    tokens_per_s: float = 0.0
    ratio: float = 1.0  # throughput over the first row's
    command: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["times"]
        return data


@dataclass
class BenchReport:
    context: int
    bandwidth_bytes_per_s: float
    decode: list[DecodeRow]
    prefill: list[PrefillRow]
    peak_rss_bytes: int
    machine: dict

    def rows(self) -> list[dict]:
        """One flat row per decode configuration, with the prefill throughput of its artifact and batch (the keys of
        ``--json``'s ``rows``)."""
        prefill = {(r.artifact, r.batch): r.tokens_per_s for r in self.prefill}
        return [{"artifact": r.artifact, "backend": r.backend, "fill": r.fill, "threshold": r.threshold,
                 "kv_fraction": r.fraction, "context": r.context, "batch": r.batch, "decode_ms_p50": r.median_ms,
                 "decode_ms_p90": r.p90_ms, "decode_ms_p99": r.p99_ms, "ratio": r.ratio, "of_floor": r.of_floor,
                 "prefill_tokens_per_s": prefill.get((r.artifact, r.batch)), "kv_bytes": r.kv_bytes,
                 "total_bytes": r.total_bytes} for r in self.decode]

    def to_dict(self) -> dict:
        return {"context": self.context, "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "rows": self.rows(),
                "decode": [r.to_dict() for r in self.decode], "prefill": [r.to_dict() for r in self.prefill],
                "peak_rss_bytes": self.peak_rss_bytes, "machine": self.machine}


def machine() -> dict:
    import os
    import platform

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort_version}


def is_checkpoint(path: str | Path) -> bool:
    """A model checkpoint rather than an artifact: a ``.pt`` or ``.safetensors`` file, or a folder holding one and
    no manifest."""
    path = Path(path)
    if path.is_dir():
        return not (path / MANIFEST).exists() and any((path / n).is_file() for n in ("model.safetensors", "model.pt"))
    return path.suffix in (".pt", ".safetensors")


def open_runner(path: str, context: int) -> Runner:
    """The opened runner of an artifact, or of a checkpoint: the eager model with a cache for ``context`` tokens, and a
    manifest of backend ``eager`` describing it (nothing is written)."""
    if not is_checkpoint(path):
        return load_runner(path).open()
    from .backends.artifact import manifest
    from .backends.eager import EagerRunner
    from .core import checkpoint

    model = checkpoint.load(path).model
    runner = EagerRunner(model, context, "evict")
    runner.manifest = manifest("eager", model, context, "evict", runner.dtype, {}, path)
    return runner


def parameters(cfg: HAMConfig) -> int:
    """The parameter count of a model of ``cfg`` (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        return HAMLM(cfg).num_parameters()


def _synchronize() -> None:
    """Wait for the GPU's queued work, so that a step's time is its own (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _thresholds(runner: Runner, fill: Fill) -> torch.Tensor:
    if fill.threshold is not None:
        return runner.check_thresholds(fill.threshold)
    return runner.check_thresholds(torch.tensor(runner.manifest.thresholds))


def bench(artifacts: Sequence[str], context: int, fills: Sequence[Fill], batches: Sequence[int], prompt: int,
          warmup: int, iterations: int, repeats: int, progress: Callable[[int, int], None] | None = None,
          measure: Callable[[Runner], list[float]] | None = None) -> BenchReport:
    """Measure every artifact x fill x batch (decode) and every artifact x batch (prefill); see the module doc."""
    if iterations < repeats:
        raise InputError(f"--iterations ({iterations}) must be at least --repeats ({repeats})")
    runners: list[Runner] = []
    try:
        for artifact in artifacts:
            runners.append(open_runner(artifact, context))
        bandwidth = read_bandwidth()
        configs = []
        for artifact, runner in zip(artifacts, runners, strict=True):
            cfg = runner.manifest.model
            n_params = parameters(cfg)
            for fill in fills:
                fractions = (own_fractions(runner, measure) if fill.fraction is None
                             else [fill.fraction] * cfg.n_layers)
                entries = [min(runner.capacity, round(f * context)) for f in fractions]
                for batch in batches:
                    row = DecodeRow(str(artifact), runner.name, fill.label, sum(fractions) / len(fractions),
                                    round(sum(entries) / len(entries)), batch, context, entries)
                    state = filled_state(runner, batch, entries)
                    row.state_bytes = sum(t.numel() * t.element_size() for t in runner.state_tensors(state))
                    memory = mem.estimate(cfg, n_params, batch, runner.capacity, runner.dtype)
                    row.kv_bytes, row.total_bytes = memory.kv_bytes, memory.total_bytes
                    row.threshold = (float(fill.threshold) if fill.threshold is not None
                                     else list(runner.manifest.thresholds))
                    row.read_bytes = (batch * cfg.n_heads * sum(entries) * (cfg.head_dim + cfg.head_dim_v)
                                      * (2 if runner.dtype == "fp16" else 4))
                    row.command = (f"ham-export bench {artifact} --context {context} --fill {fill.label} --batch "
                                   f"{batch} --iterations {iterations} --repeats {repeats}")
                    configs.append((row, runner, state, _thresholds(runner, fill)))
        total = len(configs) * (warmup + iterations) + len(runners) * len(batches) * (1 + max(3, repeats))
        done = 0

        def tick(n: int = 1) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        token_of = {b: torch.full((b,), ord("e"), dtype=torch.int64) for b in batches}
        for i, (row, runner, state, tau) in enumerate(configs):  # warm-up, each on its own state
            for _ in range(warmup):
                _, state = runner.step(token_of[row.batch], tau, state)
                tick()
            configs[i] = (row, runner, state, tau)
        per_round = iterations // repeats
        for r in range(repeats):
            steps = per_round if r < repeats - 1 else iterations - per_round * (repeats - 1)
            for i, (row, runner, state, tau) in enumerate(configs):
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    _, state = runner.step(token_of[row.batch], tau, state)
                    _synchronize()
                    times.append(time.perf_counter() - start)
                    tick()
                row.times += times
                row.round_medians.append(statistics.median(times))
                configs[i] = (row, runner, state, tau)
        rows = [c[0] for c in configs]
        for row in rows:
            row.finish(rows[0])
        empty = {(r.artifact, r.batch): r for r in rows if not any(r.entries_per_layer)}
        for row in rows:
            base = empty.get((row.artifact, row.batch))
            if base is not None:
                row.floor_ms = base.median_ms + 1e3 * row.read_bytes / bandwidth
                row.of_floor = row.median_ms / row.floor_ms

        prefill_rows = []
        gen = torch.Generator().manual_seed(0)
        for artifact, runner in zip(artifacts, runners, strict=True):
            for batch in batches:
                row = PrefillRow(str(artifact), runner.name, batch, prompt,
                                 command=f"ham-export bench {artifact} --prompt {prompt} --batch {batch}")
                tokens = torch.randint(0, runner.vocab_size, (batch, prompt), generator=gen)
                tau = runner.check_thresholds(torch.tensor(runner.manifest.thresholds))
                runner.prefill(tokens, tau)  # warm-up
                tick()
                for _ in range(max(3, repeats)):
                    start = time.perf_counter()
                    runner.prefill(tokens, tau)
                    _synchronize()
                    row.times.append(time.perf_counter() - start)
                    tick()
                row.median_ms = 1e3 * statistics.median(row.times)
                row.tokens_per_s = batch * prompt / (row.median_ms / 1e3)
                prefill_rows.append(row)
        for row in prefill_rows:
            row.ratio = row.tokens_per_s / prefill_rows[0].tokens_per_s
    finally:
        for runner in runners:
            runner.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return BenchReport(context, bandwidth, rows, prefill_rows, peak, machine())


def markdown(report: BenchReport) -> str:
    """The decode and prefill tables as Markdown (what the README's tables are pasted from)."""

    def size(n: int) -> str:
        return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n / 1024:.2f} KiB"

    lines = ["| artifact | backend | fill | cached entries (mean of layers) | batch | median ms | p90 ms | p99 ms | "
             "ratio | of floor | state held |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for r in report.decode:
        floor = "" if r.of_floor is None else f"{r.of_floor:.2f}x"
        lines.append(f"| {r.artifact} | {r.backend} | {r.fill} | {r.entries:,} | {r.batch} | {r.median_ms:.3f} | "
                     f"{r.p90_ms:.3f} | {r.p99_ms:.3f} | {r.ratio:.2f}x | {floor} | {size(r.state_bytes)} |")
    lines += ["", "| artifact | backend | batch | prompt | median ms | tokens/s | ratio |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report.prefill:
        lines.append(f"| {r.artifact} | {r.backend} | {r.batch} | {r.prompt} | {r.median_ms:.2f} | "
                     f"{r.tokens_per_s:,.0f} | {r.ratio:.2f}x |")
    return "\n".join(lines)


def plot(report: BenchReport, path) -> None:
    """A PNG of each decode row's median step time (bar), its p90 (whisker) and its floor (marker)."""
    from .memory.report import save_figure

    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'ham-export[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.decode
    labels = [f"{Path(r.artifact).name}\nfill {r.fill}, batch {r.batch}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.8), dpi=110)
    ax.bar(x, [r.median_ms for r in rows], color="tab:blue", label="median step")
    ax.errorbar(x, [r.median_ms for r in rows], yerr=[[0] * len(rows), [r.p90_ms - r.median_ms for r in rows]],
                fmt="none", ecolor="black", capsize=3, label="p90")
    floors = [(i, r.floor_ms) for i, r in enumerate(rows) if r.floor_ms is not None]
    if floors:
        ax.plot([i for i, _ in floors], [f for _, f in floors], "r_", markersize=22, mew=2, label="floor")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"decode at context {report.context} ({report.bandwidth_bytes_per_s / 1e9:.1f} GB/s read)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
