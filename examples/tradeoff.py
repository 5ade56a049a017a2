"""Print the README's table: held-out bits per byte vs cached fraction for the bundled HAM model at several
thresholds, next to the two baselines trained the same way (every token cached; none cached).

    python examples/tradeoff.py [--models examples/models] [--threshold T ...]
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ham_export.core import checkpoint
from ham_export.core.data import pydoc_corpus
from ham_export.train.evaluate import evaluate

DEFAULT_THRESHOLDS = (-1.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 3.0)


@click.command()
@click.option("--models", type=click.Path(file_okay=False, path_type=Path), default=Path("examples/models"),
              show_default=True)
@click.option("--threshold", "thresholds", type=float, multiple=True, help="Global thresholds for the HAM model.")
def main(models: Path, thresholds: tuple[float, ...]) -> None:
    torch.set_num_threads(2)
    held_out = pydoc_corpus().held_out
    ham = checkpoint.load(models / "tiny-ham.pt").model
    rows = [("tiny-ham", row) for row in evaluate(ham, held_out, [None, *(thresholds or DEFAULT_THRESHOLDS)])]
    for name in ("tiny-full", "tiny-gdn"):
        rows.append((name, evaluate(checkpoint.load(models / f"{name}.pt").model, held_out)[0]))
    print("| model | threshold | KV fraction | per layer | bits/byte |")
    print("| --- | --- | ---: | --- | ---: |")
    for name, row in sorted(rows, key=lambda r: (-r[1].kv_fraction, r[0])):
        tau = (f"{row.threshold:g}" if isinstance(row.threshold, float)
               else "own: " + ", ".join(f"{t:.3f}" for t in row.threshold))
        layers = " ".join(f"{f:.2f}" for f in row.kv_fraction_per_layer)
        print(f"| {name} | {tau} | {row.kv_fraction:.3f} | {layers} | {row.bits_per_byte:.4f} |")


if __name__ == "__main__":
    main()
