"""Decode-step latency of the bundled model: TVM (llvm) against eager PyTorch and ONNX Runtime (custom ops).

    python examples/bench_tvm.py [--model examples/models/tiny-ham.pt] [--lengths 256,4096] [--iters 30]

Same protocol as ``bench_decode.py`` (whose helpers it uses): every backend starts from the same state, every
layer's cache holding L entries, and runs decode steps at tau = -1 (each step also appends). The figure is the
median wall time of one step, on this machine, all backends measured in one run. ONNX Runtime runs the custom-op
graph with its cache buffers bound in place; it is left out, with a note, when the op library is not built. TVM
updates its caches in place too (``call_tir_inplace``). Ratios are TVM's time over the other backend's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch
from bench_decode import filled_state, time_steps

from ham_export.backends import load_runner, registry
from ham_export.backends.eager import EagerRunner
from ham_export.core import checkpoint
from ham_export.ops.libraries import ORT


@click.command()
@click.option("--model", "model_path", default="examples/models/tiny-ham.pt", show_default=True)
@click.option("--lengths", default="256,4096", show_default=True, help="Cache lengths, comma separated.")
@click.option("--iters", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch threads; ONNX Runtime and TVM use their own pools (set TVM_NUM_THREADS to match).")
def main(model_path: str, lengths: str, iters: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = checkpoint.load(model_path).model
    sizes = [int(x) for x in lengths.split(",")]
    capacity = max(sizes) + iters + 8
    with_ort = ORT.path().is_file()
    backends = registry()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"eager": EagerRunner(model, capacity, "drop"),
                   "tvm": load_runner(backends["tvm"].build(model, Path(tmp) / "tvm", capacity, "drop")).open()}
        if with_ort:
            onnx = backends["onnxruntime"].build(model, Path(tmp) / "onnx", capacity, "drop", ops="custom")
            runners["ort"] = load_runner(onnx).open()
        for length in sizes:
            rows.append((length, {name: time_steps(runner, filled_state(runner, model, length), iters)
                                  for name, runner in runners.items()}))
    print(f"decode step, batch 1, tau = -1, {threads} torch threads, median of {iters} (ms)")
    if not with_ort:
        print(f"(ONNX Runtime left out: the op library {ORT.path()} is not built; {ORT.build})")
    print("| cache length | eager | ORT custom, in place | TVM llvm, in place | TVM / eager | TVM / ORT |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for length, t in rows:
        ort = f"{t['ort']:.3f}" if with_ort else "n/a"
        vs_ort = f"{t['tvm'] / t['ort']:.2f}" if with_ort else "n/a"
        print(f"| {length} | {t['eager']:.3f} | {ort} | {t['tvm']:.3f} | {t['tvm'] / t['eager']:.2f} | {vs_ort} |")


if __name__ == "__main__":
    main()
