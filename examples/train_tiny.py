"""Train the bundled tiny HAM language model (about 0.9M parameters) on the pydoc topics, on the CPU.

    python examples/train_tiny.py                          # HAM, f_target = 0.5 -> examples/models/tiny-ham.pt
    python examples/train_tiny.py --store all -o examples/models/tiny-full.pt   # every token cached (Transformer-like)
    python examples/train_tiny.py --store none -o examples/models/tiny-gdn.pt   # no token cached (pure GDN)

Each run writes MODEL.pt, MODEL/ (model.safetensors + config.json) and MODEL.log.jsonl (one JSON row per
evaluation). Same seed, data order and step count for all three, so they compare like with like.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from ham_export.core.config import HAMConfig
from ham_export.core.data import pydoc_corpus
from ham_export.train.train import TrainConfig, run_log, train, write_run

STORE_TAU = {"all": -1.0, "none": 3.0}


@click.command()
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("examples/models/tiny-ham.pt"), show_default=True)
@click.option("--store", type=click.Choice(["target", "all", "none"]), default="target", show_default=True,
              help="target: the control loop keeps the cached fraction at --f-target; all / none: fixed tau.")
@click.option("--f-target", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True)
@click.option("--router", type=click.Choice(["cosine", "learned"]), default="cosine", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=700, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
def main(out: Path, store: str, f_target: float, router: str, steps: int, seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    corpus = pydoc_corpus()
    model_cfg = HAMConfig(router=router, context_length=256)
    if store == "target":
        train_cfg = TrainConfig(steps=steps, seed=seed, f_target=f_target)
    else:
        train_cfg = TrainConfig(steps=steps, seed=seed, f_target=None, tau_init=STORE_TAU[store])
    with run_log(out, steps, "bpb") as (log, progress):
        model, metadata = train(model_cfg, train_cfg, corpus.train, corpus.held_out, log=log, progress=progress)
        metadata.update({"data": "pydoc_data.topics", "held_out_sha256": corpus.held_out_sha256, "store": store})
        summary = write_run(model, metadata, out, log)
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
