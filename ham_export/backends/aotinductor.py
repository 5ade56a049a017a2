"""The AOTInductor backend (``ham-export native``): the prefill and decode programs compiled by AOTInductor into one
package, ``model.pt2``, holding two models, ``prefill`` and ``decode``; the manifest lies beside it.

The compiled code calls the ``ham`` ops through the dispatcher: a Python process registers them with
:mod:`ham_export.ops.library`; a C++ process loads the op library of ``runtimes/libtorch`` (``libham_torch_ops.so``,
:data:`ham_export.ops.libraries.TORCH`) before the package (``examples/cpp/aoti_greedy.cc``).

The compiled code indexes its inputs with the strides it was compiled for (contiguous), without checking them, so
the runner makes every input contiguous; inputs go to the package's device, and the state stays there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..core.model import HAMLM
from ..errors import InputError
from ..ops.libraries import TORCH
from ..ops.spec import TORCH_NAMESPACE
from . import artifact, register
from .base import Backend, Option, Runner, split_outputs
from .manifest import ArtifactError, Manifest
from .programs import describe, export_programs, program_table

log = logging.getLogger(__name__)
NAME = "aotinductor"
DEVICES = ("cpu", "cuda")


def build(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", source: str | Path | None = None,
          device: str = "cpu") -> Path:
    """Compile the two programs with AOTInductor into one package ``out`` (a ``.pt2`` file, models ``prefill`` and
    ``decode``), the manifest beside it; returns the package's path."""
    from torch._inductor import aot_compile
    from torch._inductor.package import package_aoti


    artifact.check_options(capacity, policy)
    out = Path(out)
    if out.suffix != ".pt2":
        raise InputError(f"the native package is a .pt2 file, got -o {out}")
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda needs a CUDA GPU on this machine (AOTInductor compiles for the GPU it "
                         "finds); none is visible to torch")
    out.parent.mkdir(parents=True, exist_ok=True)
    target = model if device == "cpu" else artifact.cast_copy(model, torch.float32).to(device)
    compiled = {}
    with artifact.quiet_exporter():
        for name, program in export_programs(target, capacity, policy).items():
            example_args, example_kwargs = program.example_inputs
            log.info("AOTInductor: compiling %s for %s", name, device)
            metadata = {SIGNATURE_KEY: signature(model.cfg, capacity, "fp32", name)}
            compiled[name] = aot_compile(program.module(), example_args, example_kwargs,
                                         options={"aot_inductor.package": True, "aot_inductor.metadata": metadata})
    package_aoti(str(out), compiled)
    programs = program_table(model, capacity, "fp32", {name: out.name for name in compiled},
                             {name: name for name in compiled})
    op_library = TORCH.to_manifest(namespace=TORCH_NAMESPACE,
                                   needed="in C++ only; Python registers the ops with ham_export.ops.library")
    artifact.manifest(NAME, model, capacity, policy, "fp32", programs, source, device=device,
                      op_library=op_library).write(out.parent)
    log.info("wrote AOTInductor package %s", out)
    return out


SIGNATURE_KEY = "ham.signature"
"""The package metadata key of each model's signature (:func:`signature`), checked against the manifest on load."""


def signature(cfg, capacity: int, dtype: str, program: str) -> str:
    """A program's inputs and outputs as the manifest's fields make them (names, dtypes, shapes), as one string."""
    io = describe(cfg, capacity, dtype)[program]
    return json.dumps({kind: [[t.name, t.dtype, list(t.shape)] for t in io[kind]] for kind in ("inputs", "outputs")},
                      separators=(",", ":"))


class AotiRunner(Runner):
    """The package's ``prefill`` and ``decode`` models, loaded in this process; the state stays on their device."""

    name = NAME

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.device = torch.device(manifest.options.get("device", "cpu"))
        self.fns: dict = {}

    def _load(self) -> None:
        from torch._inductor.package import load_package

        from ..ops import library  # noqa: F401  (the compiled code calls torch.ops.ham.* through the dispatcher)

        path = self.manifest.path("prefill")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ArtifactError(f"{path} was compiled for CUDA; no CUDA GPU is visible to torch here")
        for name in ("prefill", "decode"):
            try:
                self.fns[name] = load_package(str(path), model_name=self.manifest.programs[name].model_name or name)
            except Exception as exc:  # a damaged archive surfaces as whatever its reader hit
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ArtifactError(f"cannot load {name} from {path}: truncated or not an AOTInductor package "
                                    f"({type(exc).__name__}: {first})") from None
            self._check_signature(name, path)

    def _check_signature(self, name: str, path: Path) -> None:
        """The signature compiled into the package equals the one the manifest's fields give (capacity, dtype,
        layers, names and shapes); a package compiled before signatures were recorded is refused."""
        recorded = self.fns[name].get_metadata().get(SIGNATURE_KEY)
        if recorded is None:
            raise ArtifactError(f"{path}: the {name} model records no signature ({SIGNATURE_KEY}); it was compiled "
                                f"by an older ham-export: build it again")
        m = self.manifest
        want = json.loads(signature(m.model, m.capacity, m.dtype, name))
        got = json.loads(recorded)
        for kind in ("inputs", "outputs"):
            if got[kind] != want[kind]:
                bad = next((i for i, (a, b) in enumerate(zip(got[kind], want[kind], strict=False)) if a != b),
                           min(len(got[kind]), len(want[kind])))
                have = got[kind][bad] if bad < len(got[kind]) else None
                expect = want[kind][bad] if bad < len(want[kind]) else None
                raise ArtifactError(f"{path}: the {name} model is not the one its manifest describes (capacity "
                                    f"{m.capacity}, dtype {m.dtype}, {m.model.n_layers} layers): {kind} #{bad} is "
                                    f"{have}, the manifest says {expect}")

    def _release(self) -> None:
        self.fns = {}

    def _call(self, name: str, *inputs: torch.Tensor):
        args = [x.to(self.device).contiguous() for x in inputs]
        with torch.no_grad():
            return split_outputs(self.fns[name](*args))

    def _prefill(self, tokens, thresholds):
        return self._call("prefill", tokens, thresholds)

    def _step(self, token, thresholds, state):
        return self._call("decode", token, thresholds, *state)

    def state_tensors(self, state):
        return [x.detach().cpu() for x in state]


BACKEND = register(Backend(
    name=NAME, command="native",
    summary="one AOTInductor package with the prefill and decode models (model.pt2), for Python or C++",
    build=build, runner=AotiRunner, output="file",
    options=(Option("device", "--device", "cpu", "The device the package is compiled for (cuda needs a GPU here).",
                    DEVICES),),
    manifest_keys={"device": str, "op_library": dict},
    memory="AOTInductor (ham-export native): not modelled; its decode program is functional, so a step holds the old "
           "and the new state (two copies of every cache) plus its activations",
))
