"""The ``torch.export`` backend: the prefill and decode programs saved as ``prefill.pt2`` and ``decode.pt2``, run as
graph modules in this process (the ``ham`` ops come from :mod:`ham_export.ops.library`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.model import HAMLM
from . import artifact, register
from .base import Backend, Runner, split_outputs
from .manifest import ArtifactError, Manifest
from .programs import check_exported_program, export_programs, program_table

log = logging.getLogger(__name__)
NAME = "torch.export"


def build(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", source: str | Path | None = None
          ) -> Path:
    """Save the two ``torch.export`` programs and the manifest into ``out``; returns the folder."""
    artifact.check_options(capacity, policy)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, program in export_programs(model, capacity, policy).items():
        files[name] = f"{name}.pt2"
        torch.export.save(program, out / files[name])
    artifact.manifest(NAME, model, capacity, policy, "fp32", program_table(model, capacity, "fp32", files), source,
                      ops="torch.ops.ham (import ham_export.ops.library before torch.export.load)").write(out)
    log.info("wrote torch.export programs to %s", out)
    return out


class ExportedProgramRunner(Runner):
    """The ``torch.export`` programs, run as graph modules; inputs, outputs and state are CPU torch tensors."""

    name = NAME

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self.fns: dict = {}

    def _load(self) -> None:
        from ..ops import library  # noqa: F401  (the programs call torch.ops.ham.*)

        for name in ("prefill", "decode"):
            path = self.manifest.path(name)
            # torch.export.load logs a traceback before raising on a damaged file; the error below says it all.
            torch_log = logging.getLogger("torch.export")
            level = torch_log.level
            torch_log.setLevel(logging.CRITICAL)
            try:
                exported = torch.export.load(path)
            except Exception as exc:  # a damaged archive surfaces as whatever its parser hit
                raise ArtifactError(f"cannot load {path}: truncated or not a torch.export program "
                                    f"({type(exc).__name__}: {exc})") from None
            finally:
                torch_log.setLevel(level)
            check_exported_program(self.manifest, name, exported)
            self.fns[name] = exported.module()

    def _release(self) -> None:
        self.fns = {}

    @torch.no_grad()
    def _prefill(self, tokens, thresholds):
        return split_outputs(self.fns["prefill"](tokens, thresholds))

    @torch.no_grad()
    def _step(self, token, thresholds, state):
        return split_outputs(self.fns["decode"](token, thresholds, *state))

    def state_tensors(self, state):
        return [x.detach().cpu() for x in state]


BACKEND = register(Backend(
    name=NAME, command="torch", summary="the torch.export programs (prefill.pt2, decode.pt2)",
    build=build, runner=ExportedProgramRunner, manifest_keys={"ops": str},
    memory="torch.export (graph modules in PyTorch): not modelled; the decode program is functional, so a step "
           "holds the old and the new state (two copies of every cache) plus its activations",
))
