"""Decode-step and prompt latency of the bundled model: eager PyTorch vs the three ONNX forms in ONNX Runtime.

    python examples/bench_decode.py [--model examples/models/tiny-ham.pt] [--lengths 256,4096] [--iters 30]
                                    [--prompt 1024]

Decode: every backend starts from the same state, with every layer's cache holding L entries, and runs decode steps
at tau = -1 (every token is cached, so each step also appends). The figure is the median wall time of one step, on
this machine, measured in one run; ratios are against eager PyTorch, and the standard form's against the custom
form, from the same run. Prompt: the median of a few prefills of a ``--prompt``-byte prompt at the model's own
thresholds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from ham_export.backends import Runner, load_runner, registry
from ham_export.backends.eager import EagerRunner
from ham_export.backends.onnxruntime import OrtRunner
from ham_export.core import checkpoint
from ham_export.ops.reference import l2_normalize


def filled_state(runner: Runner, model, length: int, seed: int = 0) -> list[torch.Tensor]:
    """A state whose caches hold ``length`` random (unit-key) entries in every layer, in the runner's layout."""
    gen = torch.Generator().manual_seed(seed)
    state = model.init_state(1, runner.capacity)
    filled = []
    for layer in state:
        k = layer.k_cache.clone()
        k[:, :, :length] = l2_normalize(torch.randn(k[:, :, :length].shape, generator=gen))
        v = layer.v_cache.clone()
        v[:, :, :length] = torch.randn(v[:, :, :length].shape, generator=gen)
        scores = layer.score_cache.clone()
        scores[:, :length] = torch.rand(scores[:, :length].shape, generator=gen)
        filled.append(layer._replace(ssm=0.1 * torch.randn(layer.ssm.shape, generator=gen), k_cache=k, v_cache=v,
                                     score_cache=scores, length=torch.full_like(layer.length, length)))
    if isinstance(runner, EagerRunner):
        return filled
    return [t.contiguous() for layer in filled for t in layer]


def time_steps(runner: Runner, state, iters: int, warmup: int = 3) -> float:
    token = torch.tensor([ord("e")])
    tau = torch.tensor(-1.0)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        _, state = runner.step(token, tau, state)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_prefill(runner: Runner, tokens: torch.Tensor, thresholds: torch.Tensor, iters: int) -> float:
    times = []
    for _ in range(iters + 1):  # the first is a warm-up
        start = time.perf_counter()
        runner.prefill(tokens, thresholds)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


FORMS = ("custom", "standard", "portable")


@click.command()
@click.option("--model", "model_path", default="examples/models/tiny-ham.pt", show_default=True)
@click.option("--lengths", default="256,4096", show_default=True, help="Cache lengths, comma separated.")
@click.option("--iters", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--prompt", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Prompt length of the prefill timing (0: none).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
def main(model_path: str, lengths: str, iters: int, prompt: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = checkpoint.load(model_path).model
    sizes = [int(x) for x in lengths.split(",")]
    capacity = max([*sizes, prompt]) + iters + 8
    rows = []
    onnx = registry()["onnxruntime"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {ops: onnx.build(model, Path(tmp) / ops, capacity, "drop", ops=ops) for ops in FORMS}
        runners = {"eager": EagerRunner(model, capacity, "drop")}
        runners.update({ops: load_runner(folders[ops]).open() for ops in FORMS})
        runners["custom_copy"] = OrtRunner(runners["custom"].manifest, share_buffers=False).open()
        assert runners["custom"].share_buffers and runners["standard"].share_buffers
        for length in sizes:
            times = {name: time_steps(runner, filled_state(runner, model, length), iters)
                     for name, runner in runners.items()}
            rows.append((length, times))
        tokens = torch.randint(32, 127, (1, prompt), generator=torch.Generator().manual_seed(0))
        own = torch.tensor(model.cfg.thresholds, dtype=torch.float32)
        prefill = {name: time_prefill(runner, tokens, own, 3) for name, runner in runners.items()
                   if prompt and name != "custom_copy"}
    print(f"decode step, batch 1, tau = -1, {threads} threads, median of {iters} (ms; ratio = eager / backend)")
    print("| cache length | eager | ORT custom, in place | ORT custom, copy | ORT standard (opset 27), in place | "
          "standard / custom speed | ORT portable (opset 18) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for length, t in rows:
        cells = [f"{t[name]:.3f} ({t['eager'] / t[name]:.1f}x)" for name in ("custom", "custom_copy", "standard")]
        cells.append(f"{t['custom'] / t['standard']:.2f}")
        cells.append(f"{t['portable']:.3f} ({t['eager'] / t['portable']:.1f}x)")
        print(f"| {length} | {t['eager']:.3f} | " + " | ".join(cells) + " |")
    if prefill:
        print(f"\nprefill of a {prompt}-byte prompt, batch 1, own thresholds, median of 3 "
              "(ms; ratio = portable / form)")
        print("| eager | ORT custom | ORT standard (opset 27) | ORT portable (opset 18) |")
        print("| ---: | ---: | ---: | ---: |")
        print("| " + " | ".join(f"{prefill[name]:.1f} ({prefill['portable'] / prefill[name]:.2f}x)"
                                for name in ("eager", "custom", "standard", "portable")) + " |")


if __name__ == "__main__":
    main()
