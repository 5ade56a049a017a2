"""The eager model's calls as Polygraphy's input and output files, so that ``polygraphy run`` compares any artifact
(an ONNX program, a TensorRT engine) with eager, the way TensorRT users check engines.

For each threshold setting and each program, two JSON files in Polygraphy's own formats (``polygraphy.json``):

- ``<label>.<program>.inputs.json``: a list of feeds, one per call: the prefill's tokens and thresholds; each decode
  step's token, thresholds and the past state (the eager state of the call before, fed back);
- ``<label>.<program>.outputs.json``: Polygraphy ``RunResults`` of one runner, ``eager``, with one iteration per
  call: the head (logits, scores, routed, overflow) and the present state.

Names, dtypes and shapes are the manifest's (the artifact's dtype: an fp16 artifact gets fp16 state and reference
outputs, cast from the fp32 eager model). Then::

    polygraphy run decode.onnx --onnxrt --load-inputs own.decode.inputs.json --load-outputs own.decode.outputs.json \\
        --atol 1e-4 --rtol 1e-4

Cache entries past ``length`` are undefined by the ops' contract. The plugin and op-library forms write only the
entries they store, so from the zero state of a prefill they stay zero on both sides and compare equal; a form that
writes past ``length`` (a TensorScatter cache update) needs the caches left out of Polygraphy's comparison, and
``ham-export check``, which compares caches only up to ``length``, to judge them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backends.eager import EagerRunner
from ..backends.manifest import Manifest
from ..backends.programs import HEAD_OUTPUTS, state_names

NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def _label(setting: float | list[float]) -> str:
    return f"tau{setting:g}" if isinstance(setting, float) else "own"


def _arrays(names: list[str], values: list[torch.Tensor], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    return {name: value.detach().cpu().numpy().astype(NUMPY[dtypes[name]], copy=False)
            for name, value in zip(names, values, strict=True)}


def save(model, manifest: Manifest, prompts: torch.Tensor, settings: list[float | list[float]], steps: int,
         directory: str | Path) -> list[Path]:
    """Write the files for every threshold setting into ``directory``; returns their paths."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = manifest.model.n_layers
    past, present = state_names(n, "past"), state_names(n, "present")
    dtypes = {t.name: t.dtype for program in manifest.programs.values() for t in (*program.inputs, *program.outputs)}
    eager = EagerRunner(model, manifest.capacity, manifest.policy)
    written = []
    for setting in settings:
        label = _label(setting)
        tau = eager.check_thresholds(torch.as_tensor(setting, dtype=torch.float32))
        feeds: dict[str, list] = {"prefill": [], "decode": []}
        results: dict[str, list] = {"prefill": [], "decode": []}
        out, state = eager.prefill(prompts, tau)
        feeds["prefill"].append(_arrays(["tokens", "thresholds"], [prompts, tau], dtypes))
        results["prefill"].append(_arrays([*HEAD_OUTPUTS, *present],
                                          [out.logits, out.scores, out.routed, out.overflow,
                                           *eager.state_tensors(state)], dtypes))
        token = out.logits[:, -1].argmax(-1).cpu()
        for _ in range(steps):
            feeds["decode"].append(_arrays(["token", "thresholds", *past], [token, tau, *eager.state_tensors(state)],
                                           dtypes))
            out, state = eager.step(token, tau, state)
            results["decode"].append(_arrays([*HEAD_OUTPUTS, *present],
                                             [out.logits, out.scores, out.routed, out.overflow,
                                              *eager.state_tensors(state)], dtypes))
            token = out.logits.argmax(-1).cpu()
        for program in ("prefill", "decode"):
            if not feeds[program]:
                continue
            inputs = directory / f"{label}.{program}.inputs.json"
            outputs = directory / f"{label}.{program}.outputs.json"
            save_json(feeds[program], str(inputs))
            iterations = [IterationResult(outputs=r, runner_name="eager") for r in results[program]]
            RunResults([("eager", iterations)]).save(str(outputs))
            written += [inputs, outputs]
    return written


def commands(manifest: Manifest, directory: str | Path, atol: float, rtol: float) -> list[str]:
    """The ``polygraphy run`` lines that compare the artifact's ONNX programs with the files (TensorRT: swap
    ``--onnxrt`` for ``--trt`` and the file for the engine)."""
    directory = Path(directory)
    lines = []
    for inputs in sorted(directory.glob("*.inputs.json")):
        label, program = inputs.name.rsplit(".", 3)[:2]
        outputs = directory / f"{label}.{program}.outputs.json"
        target = manifest.path(program) if manifest.directory is not None else Path(f"{program}.onnx")
        runner = "--onnxrt"
        if target.suffix == ".plan":
            from ..backends.tensorrt import plugin_library

            library = plugin_library(manifest)
            runner = "--trt --model-type engine" + (f" --plugins {library}" if library else "")
        lines.append(f"polygraphy run {target} {runner} --load-inputs {inputs} --load-outputs {outputs} "
                     f"--atol {atol:g} --rtol {rtol:g}")
    return lines
