"""Check the memory model against a real ONNX Runtime decode.

For each threshold, a fresh Python process (so that no earlier run's memory counts) loads the artifact with
:func:`ham_export.backends.load_runner`, prefills ``context - steps`` bytes of text with the artifact's prefill
program, then runs ``steps`` decode steps. Measured:

- ``state_bytes``: the bytes of the state tensors the runner holds after the last step (``state_tensors``);
- ``decode_peak_bytes``: the process's peak resident memory during the decode steps after the first (which sets the
  decode session up) over its resident memory just before them (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``): the step's transient workspace;
- ``measured_bytes`` = state + decode peak, compared with the model's state + workspace for the artifact: within
  :data:`TOLERANCE` of it, or above it by at most :data:`RUNTIME_ALLOWANCE_BYTES`, ONNX Runtime's own fixed
  allocations of a decode step, which the model does not count and the row reports apart (``unmodelled_bytes``);
- for information: the resident memory added by loading the artifact and the peak of the whole process over its
  baseline after the imports (the prefill's activations, kept by ONNX Runtime's arena, dominate it);
- the cache lengths reached, compared with the fill the memory report predicts.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from pathlib import Path
from typing import Any

from ..errors import HamError, InputError
from . import sizes as mem

TOLERANCE = 0.05
RUNTIME_ALLOWANCE_BYTES = 512 * 1024
"""ONNX Runtime's fixed allocations of a decode step, which do not grow with the model, its capacity or its batch
(its allocator's and thread pool's bookkeeping, page granularity): measured at 40-220 KiB on the project's 2-core
x86_64 machine with onnxruntime 1.32, over small artifacts where they are most of the step's peak. Not modelled;
a measurement above the prediction by at most this much passes, and the row reports the excess apart."""


class MeasurementError(HamError):
    """The measurement could not run (not Linux, the op library missing, the artifact broken)."""


def agrees(predicted: int, measured: int) -> bool:
    """The prediction holds: within :data:`TOLERANCE` of the measurement, or below it by at most
    :data:`RUNTIME_ALLOWANCE_BYTES` (the runtime's unmodelled fixed allocations)."""
    return abs(predicted - measured) <= TOLERANCE * measured or 0 <= measured - predicted <= RUNTIME_ALLOWANCE_BYTES


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def _probe(artifact: str, data: bytes, context: int, batch: int, threshold: float, steps: int) -> dict[str, Any]:
    """Run in a fresh process: prefill + decode steps, and the memory they hold."""
    import time

    import torch

    from ..backends import load_runner

    torch.set_num_threads(1)
    baseline = _status()["VmRSS"]
    runner = load_runner(artifact).open()
    loaded = _status()["VmRSS"]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    need = context + batch
    tokens = tokens.repeat(-(-need // tokens.numel()))[:need] if tokens.numel() < need else tokens
    rows = torch.stack([tokens[b: b + context] for b in range(batch)])
    tau = torch.tensor([threshold])
    prefill = context - steps
    start = time.perf_counter()
    _, state = runner.prefill(rows[:, :prefill], tau)
    prefill_s = time.perf_counter() - start
    # The decode session's first run sets itself up (its arena, kernel caches): a one-time cost, not the
    # step's workspace, so the first step runs before the peak is reset.
    _, state = runner.step(rows[:, prefill], tau, state)
    status = _status()
    before, prefill_peak = status["VmRSS"], status["VmHWM"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    start = time.perf_counter()
    for t in range(prefill + 1, context):
        _, state = runner.step(rows[:, t], tau, state)
    decode_s = time.perf_counter() - start
    after = _status()
    held = runner.state_tensors(state)
    lengths = [int(x.max()) for x in held[5::6]]
    return {"threshold": threshold, "prefill_tokens": prefill, "decode_steps": steps,
            "state_bytes": sum(t.numel() * t.element_size() for t in held),
            "decode_peak_bytes": after["VmHWM"] - before, "rss_growth_during_decode": after["VmRSS"] - before,
            "load_bytes": loaded - baseline,
            "process_peak_over_baseline": max(prefill_peak, after["VmHWM"]) - baseline,
            "cache_length_per_layer": lengths, "prefill_seconds": prefill_s, "decode_seconds": decode_s}


def verify_ort(artifact: str | Path, data: bytes, context: int, thresholds: list[float], batch: int = 1,
               steps: int = 8, expected_fill: dict[float, list[float]] | None = None) -> list[dict[str, Any]]:
    """Predicted against measured memory of the ONNX Runtime artifact at each threshold (see the module doc).

    ``expected_fill``: per threshold, the predicted cache entries per layer at ``context`` (from the memory
    report), compared with the lengths reached (capped at the artifact's capacity)."""
    from ..backends import read_manifest
    from ..backends.onnxruntime import shares_caches

    manifest = read_manifest(artifact)
    directory = manifest.directory
    if manifest.backend != "onnxruntime":
        raise InputError(f"memory verification runs ONNX Runtime artifacts; {directory} is a "
                         f"{manifest.backend} artifact")
    if not Path("/proc/self/clear_refs").exists():
        raise MeasurementError("measuring the peak memory needs Linux /proc/self/clear_refs")
    if steps < 2 or context <= steps:
        raise InputError(f"need 2 <= steps < context (the first step warms the session up), got steps={steps}, "
                         f"context={context}")
    cfg, capacity, dtype = manifest.model, manifest.capacity, manifest.dtype
    state = mem.estimate(cfg, 0, batch, capacity, dtype, workspace=False)
    workspace = mem.ort_decode_workspace_bytes(cfg, batch, capacity, dtype, shares_caches(manifest))
    results = []
    for threshold in thresholds:
        with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                measured = pool.submit(_probe, str(directory), data, context, batch, float(threshold), steps).result()
            except HamError:
                raise
            except Exception as exc:  # the child's failure, whatever it was, is reported with its type
                raise MeasurementError(f"the measurement at threshold {threshold} failed: "
                                       f"{type(exc).__name__}: {exc}") from None
        predicted = state.state_bytes + state.kv_bytes + workspace
        total = measured["state_bytes"] + measured["decode_peak_bytes"]
        row = {**measured, "capacity": capacity, "dtype": dtype,
               "predicted_state_bytes": state.state_bytes + state.kv_bytes, "predicted_workspace_bytes": workspace,
               "predicted_bytes": predicted, "measured_bytes": total,
               "relative_difference": (predicted - total) / total,
               "unmodelled_bytes": max(0, total - predicted), "runtime_allowance_bytes": RUNTIME_ALLOWANCE_BYTES}
        row["within_tolerance"] = agrees(predicted, total)
        if expected_fill and threshold in expected_fill:
            row["predicted_cache_length_per_layer"] = [min(capacity, e) for e in expected_fill[threshold]]
        results.append(row)
    return results
