"""Train the models of the associative-recall task (``ham_export/train/recall.py``) on the CPU.

    python examples/train_recall.py                    # HAM, learned router, 15% cached -> recall-ham.pt
    python examples/train_recall.py --store all --router cosine -o examples/models/recall-full.pt  # every token
    python examples/train_recall.py --store none --router cosine -o examples/models/recall-gdn.pt  # none (pure GDN)

(the bundled models; ``--seed 1 -o ...-s1.pt`` the second seed). A fixed threshold of -1 or 3 never consults the
router, so the baselines carry the cosine router, which has no weights. The three share size (but for the learned
router's 4K weights), steps, data order and seed, so they compare like with like. Each batch is one of the
training tasks (short and long sequences mixed: the short ones teach the lookup), its records and queries written
into training text of the pydoc topics; the loss is on the queried values only. Each run writes MODEL.pt, MODEL/
(safetensors + config.json) and MODEL.log.jsonl (one JSON row per evaluation: recall accuracy on held-out text at
the longest training context). The checkpoint's metadata names the task, so ``ham-export eval MODEL --task recall``
evaluates on it by default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import torch

from ham_export.core.config import HAMConfig
from ham_export.core.data import pydoc_corpus
from ham_export.train import recall
from ham_export.train.train import TrainConfig, run_log, train, write_run

STORE_TAU = {"all": -1.0, "none": 3.0}
MODEL = HAMConfig(d_model=64, n_layers=2, n_heads=2, head_dim=32, head_dim_v=32, mlp_hidden=192, context_length=512)
# (context, pairs): the curriculum's tasks, one more opened every STAGE_STEPS steps; two-byte keys, one-byte values,
# half the records queried
CURRICULUM = ((64, 4), (128, 8), (256, 16), (512, 32))
STAGE_STEPS = 300
KEY_LEN, VALUE_LEN = 2, 1


def tasks() -> list[recall.RecallTask]:
    return [recall.RecallTask(context=c, pairs=p, queries=p // 2, key_len=KEY_LEN, value_len=VALUE_LEN)
            for c, p in CURRICULUM]


@click.command()
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("examples/models/recall-ham.pt"), show_default=True)
@click.option("--store", type=click.Choice(["target", "all", "none"]), default="target", show_default=True,
              help="target: the control loop keeps the cached fraction at --f-target; all / none: fixed tau.")
@click.option("--f-target", type=click.FloatRange(0.0, 1.0), default=0.15, show_default=True)
@click.option("--tau-init", type=float, default=-1.0, show_default=True,
              help="target: the threshold of the warm-up (-1: every token cached while the lookup is learned).")
@click.option("--tau-warmup", type=click.IntRange(min=0), default=900, show_default=True,
              help="target: steps before the control loop starts moving the thresholds.")
@click.option("--router", type=click.Choice(["cosine", "learned"]), default="learned", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
def main(out: Path, store: str, f_target: float, tau_init: float, tau_warmup: int, router: str, steps: int,
         seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    corpus = pydoc_corpus()
    training = tasks()
    longest = training[-1]
    if store == "target":
        train_cfg = TrainConfig(steps=steps, seed=seed, f_target=f_target, seq_len=longest.context, eval_every=100,
                                warmup_steps=20, tau_init=tau_init, tau_warmup_steps=tau_warmup)
    else:
        train_cfg = TrainConfig(steps=steps, seed=seed, f_target=None, tau_init=STORE_TAU[store],
                                seq_len=longest.context, eval_every=100, warmup_steps=20)

    def validate(model) -> dict:
        row = recall.evaluate_recall(model, longest, corpus.held_out, sequences=64)[0]
        return {"val_accuracy": round(row.accuracy, 4), "val_kv_fraction": round(row.kv_fraction, 4)}

    with run_log(out, steps, "loss") as (log, progress):
        model, metadata = train(dataclasses.replace(MODEL, router=router), train_cfg, corpus.train,
                                corpus.held_out, log=log, progress=progress,
                                sampler=recall.sampler(training, corpus.train, STAGE_STEPS), validate=validate)
        metadata.update({"data": "recall task over pydoc_data.topics", "held_out_sha256": corpus.held_out_sha256,
                         "store": store, "recall": dataclasses.asdict(longest),
                         "curriculum": [dataclasses.asdict(t) for t in training]})
        summary = write_run(model, metadata, out, log)
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
