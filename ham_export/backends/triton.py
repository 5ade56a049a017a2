"""The Triton backend: the eager model on a CUDA GPU, every HAM op on the Triton kernels of
:mod:`ham_export.kernels`, caches and GDN state updated in place.

The artifact is the weights as a safetensors checkpoint (``model.safetensors`` and ``config.json``, loadable with
``ham_export.core.checkpoint.load``) and the manifest, which fixes the cache capacity and the overflow policy. The
runner loads the weights onto the device and runs :meth:`~ham_export.core.model.HAMLM.run_with_state` with
``in_place=True``: the ``ham`` ops dispatch to the Triton kernels on CUDA tensors (``ham::cache_append_`` writes only
the new cache entries) and the state stays on the device between calls.

On a machine without a GPU the same path runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
slow): that is how the tests check it against the reference.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..core import checkpoint
from ..core.model import HAMLM
from ..errors import InputError
from ..ops import library
from . import artifact, register
from .base import Backend, Runner
from .eager import head
from .manifest import ArtifactError, Manifest
from .programs import flatten_state, unflatten_state

NAME = "triton"
WEIGHTS = checkpoint.SAFETENSORS
DEVICES = ("auto", "cuda", "cpu")


def build(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", source: str | Path | None = None
          ) -> Path:
    """Write the weights (safetensors) and the manifest into ``out``; returns the folder."""
    artifact.check_options(capacity, policy)
    out = Path(out)
    checkpoint.save_safetensors(model, out, {"source": str(source) if source else None})
    artifact.manifest(NAME, model, capacity, policy, "fp32", {}, source, weights=WEIGHTS,
                      ops="torch.ops.ham on the Triton kernels of ham_export.kernels, caches in place").write(out)
    return out


def check_device(device: torch.device) -> None:
    """Refuse a device the kernels cannot run on here, with the reason."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("the Triton path was asked for CUDA, but no CUDA GPU is visible to torch")
    elif device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError("the Triton kernels need a CUDA GPU; on the CPU they run only under TRITON_INTERPRET=1 "
                             "(Triton's interpreter, slow)")
    else:
        raise InputError(f"the Triton path runs on cuda (or cpu under TRITON_INTERPRET=1), not {device}")


class TritonRunner(Runner):
    """The model with every ``ham`` op on its Triton kernel, state in place on the device.

    ``device``: ``cuda``, or ``cpu`` (under ``TRITON_INTERPRET=1``); default: cuda when a GPU is visible. ``model``:
    run these weights instead of loading the artifact's (the tests pass a model in memory).
    """

    name = NAME

    def __init__(self, manifest: Manifest, device: str | torch.device | None = None,
                 model: HAMLM | None = None) -> None:
        super().__init__(manifest)
        if manifest.policy not in ("drop", "evict"):
            raise InputError(f"the Triton path's policy is drop or evict, got {manifest.policy!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._given = model
        self.model: HAMLM | None = None

    @classmethod
    def for_model(cls, model: HAMLM, capacity: int, policy: str, device: str | torch.device | None = None
                  ) -> TritonRunner:
        """A runner of ``model`` (in memory, no artifact folder) with this capacity and policy."""
        if policy not in ("drop", "evict"):
            raise InputError(f"the Triton path's policy is drop or evict, got {policy!r}")
        return cls(artifact.manifest(NAME, model, capacity, policy, "fp32", {}, None, weights=WEIGHTS),
                   device, model)

    def _load(self) -> None:
        check_device(self.device)
        if library.force_reference():
            raise InputError(f"{library.FORCE_REFERENCE} is set: it asks for the reference, not the Triton path")
        for name in ("cache_attention", "cache_append_", "gdn_prefill"):  # a missing Triton fails here, not mid-run
            for _, target in library.TRITON_KERNELS[name]:
                library.load_kernel(name, target)
        if self._given is not None:
            model = self._given
        else:
            weights = self.manifest.directory / self.manifest.options["weights"]
            if not weights.is_file():
                raise ArtifactError(f"the weights of the Triton artifact are missing: {weights}")
            model = checkpoint.load(self.manifest.directory).model
            if model.cfg != self.manifest.model:
                raise ArtifactError(f"{weights}: the weights' config is not the one the manifest describes "
                                    f"({_config_difference(model.cfg, self.manifest.model)})")
        weight = model.embed.weight
        if weight.device != self.device:
            model = artifact.cast_copy(model, weight.dtype).to(self.device)
        self.model = model.eval()

    def _release(self) -> None:
        self.model = None

    def _kernels(self):
        return library.triton_on_cpu() if self.device.type == "cpu" else contextlib.nullcontext()

    @torch.no_grad()
    def _run(self, tokens, thresholds, state, decode: bool):
        with self._kernels():
            logits, state, routes = self.model.run_with_state(tokens.to(self.device), state,
                                                              thresholds.to(self.device), self.policy, decode,
                                                              in_place=True)
        return head(logits, routes), state

    def _prefill(self, tokens, thresholds):
        weight = self.model.embed.weight
        state = self.model.init_state(tokens.shape[0], self.capacity, weight.device, weight.dtype)
        return self._run(tokens, thresholds, state, decode=False)

    def _step(self, token, thresholds, state):
        return self._run(token, thresholds, state, decode=True)

    def state_tensors(self, state):
        return [x.detach().cpu().clone() for x in flatten_state(state)]

    def state_from_tensors(self, tensors):
        return unflatten_state([t.to(self.device).contiguous() for t in tensors])


def _requires() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'ham-export[triton]')"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU is visible to torch (the kernels run on the CPU only under TRITON_INTERPRET=1)"
    return None


BACKEND = register(Backend(
    name=NAME, command="triton",
    summary="the weights for the native PyTorch path: the ham ops on Triton kernels, caches in place (CUDA)",
    build=build, runner=TritonRunner, requires=_requires, programs=(),
    manifest_keys={"weights": str, "ops": str},
    memory="Triton (eager PyTorch on a GPU): not modelled; caches and GDN state are updated in place, so a step "
           "holds the state plus its activations",
))


def _config_difference(have, want) -> str:
    """The first field where two model configs differ, as ``name: have, the manifest says want``."""
    import dataclasses

    for f in dataclasses.fields(have):
        a, b = getattr(have, f.name), getattr(want, f.name)
        if a != b:
            return f"{f.name}: {a!r}, the manifest says {b!r}"
    return "equal"
