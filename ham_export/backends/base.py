"""What every backend is made of: a :class:`Backend` entry (its builder, its runner, its options) and a
:class:`Runner` with one small interface, as Polygraphy's runners have.

A runner has an explicit lifecycle: :meth:`Runner.open` loads what it runs (sessions, compiled programs, weights on
a device), :meth:`Runner.close` releases it; ``with runner:`` does both. In between:

- :meth:`Runner.prefill` runs a prompt from an empty state, :meth:`Runner.step` one token per sequence from a state;
  both check their inputs (token ids, thresholds) and return an :class:`Output` and the new state;
- the state is the backend's own (device tensors, ONNX Runtime buffers bound in place, TVM tensors) and stays where
  the backend keeps it; :meth:`Runner.state_tensors` copies it to the CPU as the flat list of torch tensors of
  :func:`ham_export.backends.programs.flatten_state`, for comparison; :meth:`Output.cpu` does the same for outputs.

A row that a device kernel refused for a cache length outside [0, C] (``overflow = -1``, see
:mod:`ham_export.ops.spec`) is an :class:`~ham_export.errors.InputError` here, at the runner's boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.model import HAMLM, resolve_thresholds
from ..errors import InputError
from ..ops.spec import INVALID_LENGTH
from .manifest import ArtifactError, Manifest


@dataclass
class Output:
    """One call's results: logits [B, T, V] (prefill) or [B, V] (step); scores, routed [L, B, T]; overflow [L, B]."""

    logits: torch.Tensor
    scores: torch.Tensor
    routed: torch.Tensor
    overflow: torch.Tensor

    def cpu(self) -> Output:
        """The same results as CPU tensors (a copy for device tensors, the tensors themselves on the CPU)."""
        return Output(*(x.detach().cpu() for x in (self.logits, self.scores, self.routed, self.overflow)))


@dataclass(frozen=True)
class Option:
    """A backend's own build option: a keyword of its builder and a flag of its CLI command."""

    name: str  # the builder's keyword
    flag: str  # e.g. "--ops"
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    type: type = str  # str, int, or bool (a flag)


@dataclass(frozen=True)
class Backend:
    """One backend, registered once (:func:`ham_export.backends.register`).

    Attributes:
        name: the manifest's ``backend``.
        command: the CLI command that builds it (``ham-export <command> MODEL -o OUT``).
        summary: one line, for the CLI's help.
        build: ``build(model, out, capacity=..., policy=..., source=..., **options) -> Path``: writes the artifact
            (a folder, or a package file with the manifest beside it) and returns its path.
        runner: ``runner(manifest) -> Runner``, unopened.
        options: the builder's own keywords.
        output: ``"folder"`` or ``"file"`` (what ``-o`` names).
        programs: the programs the manifest must name.
        manifest_keys: the backend's own manifest keys and their JSON types.
        memory: what ``ham-export memory`` can say about this backend's memory.
        requires: a function that returns None when the backend can run here, else why not (and how to fix it).
        usage: ``usage(path) -> str``: what to run next with a built artifact (printed by the export command in
            place of the generic line), or None.
    """

    name: str
    command: str
    summary: str
    build: Callable[..., Path]
    runner: Callable[[Manifest], Runner]
    options: tuple[Option, ...] = ()
    output: str = "folder"
    programs: tuple[str, ...] = ("prefill", "decode")
    manifest_keys: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    memory: str = ""
    requires: Callable[[], str | None] = lambda: None
    usage: Callable[[Path], str] | None = None


class Runner(ABC):
    """Runs a HAM model's prefill and decode on one backend (see the module doc)."""

    name: str = "runner"

    def __init__(self, manifest: Manifest | None = None) -> None:
        self.manifest = manifest
        self._open = False

    # -- what the artifact says -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._require_manifest().capacity

    @property
    def policy(self) -> str:
        return self._require_manifest().policy

    @property
    def dtype(self) -> str:
        return self._require_manifest().dtype

    @property
    def n_layers(self) -> int:
        return self._require_manifest().model.n_layers

    @property
    def vocab_size(self) -> int:
        return self._require_manifest().model.vocab_size

    def _require_manifest(self) -> Manifest:
        if self.manifest is None:
            raise ArtifactError(f"the {self.name} runner has no manifest")
        return self.manifest

    def check_model(self, model: HAMLM) -> None:
        """Refuse to compare an artifact with a model it was not exported from."""
        self._require_manifest().check_weights(model)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def open(self) -> Runner:
        """Load what the runner runs; idempotent. Returns the runner."""
        if not self._open:
            self._load()
            self._open = True
        return self

    def close(self) -> None:
        """Release what :meth:`open` loaded; the runner can be opened again."""
        if self._open:
            self._release()
            self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def __enter__(self) -> Runner:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe_signature(self) -> None:
        """Refuse compiled programs that are not the ones the manifest's fields describe, where the programs carry no
        signature to read: run a one-token prefill and a decode step from its state, and compare what comes out
        (dtypes, and the shapes the capacity, the layer count and the vocabulary fix) with the manifest."""
        from .programs import STATE_FIELDS, check_graph

        n = self.n_layers
        names = [f"present.{i}.{f}" for i in range(n) for f in STATE_FIELDS]
        state = None
        for program in ("prefill", "decode"):
            try:
                if program == "prefill":
                    out, state = self._prefill(torch.zeros(1, 1, dtype=torch.int64), self.check_thresholds(3.0))
                else:
                    out, state = self._step(torch.zeros(1, dtype=torch.int64), self.check_thresholds(3.0), state)
                head = out.cpu()
                tensors = [head.logits, head.scores, head.routed, head.overflow, *self.state_tensors(state)]
            except Exception as exc:  # a program of other shapes fails in whatever way its runtime fails
                raise ArtifactError(f"{self.manifest.path(program)}: the {program} program does not run as its "
                                    f"manifest describes it ({type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''})"
                                    ) from None
            rows = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                    for name, t in zip(["logits", "scores", "routed", "overflow", *names], tensors, strict=False)]
            check_graph(self.manifest, program, [], rows, outputs_only=True)

    def _load(self) -> None:  # noqa: B027  (a runner with nothing to load keeps this)
        """Load the backend's sessions or programs (called once by :meth:`open`)."""

    def _release(self) -> None:  # noqa: B027
        """Drop them (called by :meth:`close`)."""

    # -- running --------------------------------------------------------------------------------------------

    def check_tokens(self, tokens: torch.Tensor, dims: int) -> torch.Tensor:
        if (not isinstance(tokens, torch.Tensor) or tokens.dim() != dims
                or tokens.dtype not in (torch.int32, torch.int64) or tokens.numel() == 0):
            raise InputError(f"tokens must be a non-empty integer tensor with {dims} dims, got "
                             f"{tuple(getattr(tokens, 'shape', ()))} {getattr(tokens, 'dtype', type(tokens))}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise InputError(f"token ids must be in [0, {self.vocab_size})")
        return tokens.to(torch.int64)

    def check_thresholds(self, thresholds: torch.Tensor | float) -> torch.Tensor:
        return resolve_thresholds(thresholds, self.n_layers)

    def prefill(self, tokens: torch.Tensor, thresholds: torch.Tensor | float) -> tuple[Output, Any]:
        """Prompt tokens [B, T] from an empty state -> (output, state)."""
        self._require_open()
        out, state = self._prefill(self.check_tokens(tokens, 2), self.check_thresholds(thresholds))
        return self._refuse_invalid_rows(out), state

    def step(self, token: torch.Tensor, thresholds: torch.Tensor | float, state: Any) -> tuple[Output, Any]:
        """One token [B] per sequence -> (output, new state)."""
        self._require_open()
        out, state = self._step(self.check_tokens(token, 1), self.check_thresholds(thresholds), state)
        return self._refuse_invalid_rows(out), state

    def _require_open(self) -> None:
        if not self._open:
            raise InputError(f"the {self.name} runner is not open: call open() first, or use `with runner:`")

    @staticmethod
    def _refuse_invalid_rows(out: Output) -> Output:
        if bool((out.overflow == INVALID_LENGTH).any()):
            layer, row = (int(i) for i in (out.overflow == INVALID_LENGTH).nonzero()[0])
            raise InputError(f"the state's cache length of sequence {row} in layer {layer} is outside [0, capacity]: "
                             f"the kernels refused it (nothing was written)")
        return out

    @abstractmethod
    def _prefill(self, tokens: torch.Tensor, thresholds: torch.Tensor) -> tuple[Output, Any]: ...

    @abstractmethod
    def _step(self, token: torch.Tensor, thresholds: torch.Tensor, state: Any) -> tuple[Output, Any]: ...

    def state_from_tensors(self, tensors: list[torch.Tensor]) -> Any:
        """A state this runner's ``step`` takes, from CPU tensors in :meth:`state_tensors` order (a benchmark's
        prepared state). The default: the tensors themselves, contiguous."""
        return [t.contiguous() for t in tensors]

    @abstractmethod
    def state_tensors(self, state: Any) -> list[torch.Tensor]:
        """The state as CPU torch tensors, in :func:`~ham_export.backends.programs.flatten_state` order."""


def split_outputs(outputs) -> tuple[Output, list]:
    """A program's flat outputs -> (the head as an :class:`Output`, the state)."""
    from .programs import HEAD_OUTPUTS

    outputs = list(outputs)
    return Output(*outputs[: len(HEAD_OUTPUTS)]), outputs[len(HEAD_OUTPUTS):]
