"""The README's recall figures: accuracy of the bundled recall models against context length and, for HAM, against
the cached fraction as its thresholds are swept; Markdown tables on stdout and a plot.

    python examples/recall_report.py [--plot docs/recall.png] [--sequences 128]

Models: ``examples/models/recall-{ham,full,gdn}.pt`` (seed 0) and ``recall-{ham,full,gdn}-s1.pt`` (seed 1) where
present, all trained by ``examples/train_recall.py``. Every figure is exact-match accuracy on the same sequences
(held-out text as distractor, 32 records, 16 queries, seed 1234), from ``ham_export.train.recall.evaluate_recall``
(what ``ham-export eval --task recall`` prints).
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import click
import torch

from ham_export.core import checkpoint
from ham_export.core.data import pydoc_corpus
from ham_export.train.recall import RecallTask, evaluate_recall, thresholds_for_fractions

MODELS = Path(__file__).resolve().parent / "models"
KINDS = ("ham", "full", "gdn")
CONTEXTS = (256, 512, 1024, 2048)
SWEEP_CONTEXT = 1024
FRACTIONS = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.0)  # the swept cached fraction of each layer


def runs() -> dict[str, list[Path]]:
    """Per kind, the checkpoints of every seed found."""
    found = {}
    for kind in KINDS:
        paths = [MODELS / f"recall-{kind}.pt", *sorted(MODELS.glob(f"recall-{kind}-s*.pt"))]
        found[kind] = [p for p in paths if p.is_file()]
    return found


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


@click.command()
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/recall.png"),
              show_default=True)
@click.option("--sequences", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
def main(plot: Path, sequences: int, threads: int) -> None:
    torch.set_num_threads(threads)
    text = pydoc_corpus().held_out
    found = runs()
    base = RecallTask()
    by_context: dict[str, list[list[tuple[float, float]]]] = {}  # kind -> per seed: (accuracy, fraction) per context
    for kind, paths in found.items():
        for path in paths:
            model = checkpoint.load(path).model
            rows = []
            for context in CONTEXTS:
                [row] = evaluate_recall(model, dataclasses.replace(base, context=context), text, [None], sequences)
                rows.append((row.accuracy, row.kv_fraction))
            by_context.setdefault(kind, []).append(rows)
    print(f"Accuracy at each model's own thresholds ({base.pairs} records, {base.queries} queries, {sequences} "
          f"sequences; mean ± standard deviation over seeds, then each seed):\n")
    print("| model | seeds | " + " | ".join(f"context {c}" for c in CONTEXTS) + " | KV fraction |")
    print("| --- | ---: | " + " | ".join("---:" for _ in CONTEXTS) + " | ---: |")
    for kind, seeds in by_context.items():
        cells = [spread([s[i][0] for s in seeds]) for i in range(len(CONTEXTS))]
        fraction = statistics.fmean(s[-1][1] for s in seeds)
        print(f"| recall-{kind} | {len(seeds)} | " + " | ".join(cells) + f" | {fraction:.3f} |")

    sweep: list[list[tuple[float, float]]] = []
    task = dataclasses.replace(base, context=SWEEP_CONTEXT)
    for path in found["ham"]:
        model = checkpoint.load(path).model
        taus = thresholds_for_fractions(model, task, text, FRACTIONS, sequences)
        rows = evaluate_recall(model, task, text, taus, sequences)
        sweep.append([(r.accuracy, r.kv_fraction) for r in rows])
    print(f"\nrecall-ham with its thresholds swept, context {SWEEP_CONTEXT}: each layer's threshold is the quantile of "
          f"its router scores that caches the fraction asked (mean over seeds):\n")
    print("| fraction asked | KV fraction | accuracy |")
    print("| ---: | ---: | ---: |")
    for i, f in enumerate(FRACTIONS):
        print(f"| {f:g} | {spread([s[i][1] for s in sweep])} | "
              f"{spread([s[i][0] for s in sweep])} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for s, seed_rows in enumerate(sweep):
        left.plot([f for _, f in seed_rows], [a for a, _ in seed_rows], "o-", color="C0",
                  label="recall-ham, thresholds swept" if s == 0 else None)
    at = CONTEXTS.index(SWEEP_CONTEXT)
    for s, seeds in enumerate(by_context["ham"]):
        left.plot([seeds[at][1]], [seeds[at][0]], "*", color="C0", markersize=14,
                  label="recall-ham, own thresholds" if s == 0 else None)
    for kind, color in (("full", "C1"), ("gdn", "C2")):
        for s, seeds in enumerate(by_context.get(kind, [])):
            left.axhline(seeds[at][0], color=color, ls="--", label=f"recall-{kind}" if s == 0 else None)
    left.set(xlabel="cached fraction of tokens", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
             title=f"context {SWEEP_CONTEXT}")
    left.legend()
    for kind, color in zip(KINDS, ("C0", "C1", "C2"), strict=True):
        for s, seeds in enumerate(by_context.get(kind, [])):
            right.plot(CONTEXTS, [a for a, _ in seeds], "o-", color=color, label=f"recall-{kind}" if s == 0 else None)
    right.set(xscale="log", xlabel="context (bytes)", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
              title="own thresholds")
    right.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
    right.minorticks_off()
    right.legend()
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=100)
    print(f"\nwrote {plot}")


if __name__ == "__main__":
    main()
