"""One small interface to run a HAM model on any backend: prefill, step, state in and out.

A runner's state is its own (torch tensors, ONNX Runtime values); :meth:`Runner.state_tensors` shows it as the
flat list of torch tensors of :func:`ham_export.programs.flatten_state`, for comparison. Every output comes back
as torch tensors on the CPU. :func:`load_runner` opens any artifact folder by its manifest.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import manifest as mf
from .errors import InputError
from .model import HAMLM, resolve_thresholds
from .programs import HEAD_OUTPUTS, flatten_state, state_names, unflatten_state

log = logging.getLogger(__name__)


@dataclass
class Output:
    """One call's results: logits [B, T, V] (prefill) or [B, V] (step); scores, routed [L, B, T]; overflow [L, B]."""

    logits: torch.Tensor
    scores: torch.Tensor
    routed: torch.Tensor
    overflow: torch.Tensor

    def cpu(self) -> Output:
        return Output(self.logits.cpu(), self.scores.cpu(), self.routed.cpu(), self.overflow.cpu())


class Runner(ABC):
    name: str
    capacity: int
    policy: str
    n_layers: int
    vocab_size: int
    dtype: str = "fp32"
    manifest: dict[str, Any] | None = None

    def check_model(self, model: HAMLM) -> None:
        """Refuse to compare an artifact with a model it was not exported from."""
        if self.manifest is None:
            return
        from .checkpoint import weights_sha256

        expected = self.manifest.get("model_sha256")
        if expected and expected != weights_sha256(model):
            raise mf.ArtifactError(f"the artifact was exported from other weights (source: "
                                   f"{self.manifest.get('source')}); export it again from this model")

    def check_tokens(self, tokens: torch.Tensor, dims: int) -> torch.Tensor:
        if tokens.dim() != dims or tokens.dtype not in (torch.int32, torch.int64) or tokens.numel() == 0:
            raise InputError(f"tokens must be a non-empty integer tensor with {dims} dims, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise InputError(f"token ids must be in [0, {self.vocab_size})")
        return tokens.to(torch.int64)

    def check_thresholds(self, thresholds: torch.Tensor) -> torch.Tensor:
        return resolve_thresholds(thresholds, self.n_layers)

    def prefill(self, tokens: torch.Tensor, thresholds: torch.Tensor) -> tuple[Output, Any]:
        """Prompt tokens [B, T] from an empty state -> (output, state)."""
        return self._prefill(self.check_tokens(tokens, 2), self.check_thresholds(thresholds))

    def step(self, token: torch.Tensor, thresholds: torch.Tensor, state: Any) -> tuple[Output, Any]:
        """One token [B] per sequence -> (output, new state)."""
        return self._step(self.check_tokens(token, 1), self.check_thresholds(thresholds), state)

    @abstractmethod
    def _prefill(self, tokens: torch.Tensor, thresholds: torch.Tensor) -> tuple[Output, Any]: ...

    @abstractmethod
    def _step(self, token: torch.Tensor, thresholds: torch.Tensor, state: Any) -> tuple[Output, Any]: ...

    @abstractmethod
    def state_tensors(self, state: Any) -> list[torch.Tensor]: ...


def _split(outputs) -> tuple[Output, list[torch.Tensor]]:
    head = Output(*outputs[: len(HEAD_OUTPUTS)])
    return head, list(outputs[len(HEAD_OUTPUTS):])


class EagerRunner(Runner):
    """The plain-PyTorch model (the reference every artifact is checked against)."""

    name = "eager"

    def __init__(self, model: HAMLM, capacity: int, policy: str) -> None:
        self.model, self.capacity, self.policy = model.eval(), capacity, policy
        self.n_layers, self.vocab_size = model.cfg.n_layers, model.cfg.vocab_size

    @torch.no_grad()
    def _prefill(self, tokens, thresholds):
        state = self.model.init_state(tokens.shape[0], self.capacity)
        logits, state, routes = self.model.prefill(tokens, state, thresholds, self.policy)
        return self._output(logits, routes), state

    @torch.no_grad()
    def _step(self, token, thresholds, state):
        logits, state, routes = self.model.step(token, state, thresholds, self.policy)
        return self._output(logits, routes), state

    @staticmethod
    def _output(logits, routes) -> Output:
        return Output(logits, torch.stack([r.score for r in routes]), torch.stack([r.routed for r in routes]),
                      torch.stack([r.overflow for r in routes]))

    def state_tensors(self, state):
        return flatten_state(state)


class TritonRunner(Runner):
    """The eager model with every HAM op on the Triton kernels (:mod:`ham_export.triton_path`), state in place.

    On a CUDA GPU (the default device when one exists) this is the fast eager decode; on the CPU the kernels run
    only under ``TRITON_INTERPRET=1``. Outputs come back to the CPU; :meth:`state_tensors` returns CPU copies.
    """

    name = "triton"

    def __init__(self, model: HAMLM, capacity: int, policy: str, device: str | torch.device | None = None) -> None:
        from .triton_path import TritonKernels, check_device

        if policy not in ("drop", "evict"):
            raise InputError(f"the Triton path's policy is drop or evict, got {policy!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_device(self.device)
        self.kernels = TritonKernels()
        weight = model.embed.weight
        self.model = (model if weight.device == self.device else copy.deepcopy(model).to(self.device)).eval()
        self.capacity, self.policy = capacity, policy
        self.n_layers, self.vocab_size = model.cfg.n_layers, model.cfg.vocab_size

    @torch.no_grad()
    def _run(self, tokens, thresholds, state, decode: bool):
        logits, state, routes = self.model.run_with_state(tokens.to(self.device), state, thresholds.to(self.device),
                                                          self.policy, decode, self.kernels)
        return EagerRunner._output(logits, routes).cpu(), state

    def _prefill(self, tokens, thresholds):
        weight = self.model.embed.weight
        state = self.model.init_state(tokens.shape[0], self.capacity, weight.device, weight.dtype)
        return self._run(tokens, thresholds, state, decode=False)

    def _step(self, token, thresholds, state):
        return self._run(token, thresholds, state, decode=True)

    def state_tensors(self, state):
        return [x.detach().cpu().clone() for x in flatten_state(state)]


class ExportedProgramRunner(Runner):
    """The ``torch.export`` programs, run as graph modules (from memory or ``prefill.pt2`` / ``decode.pt2``)."""

    name = "torch.export"

    def __init__(self, programs: dict[str, torch.export.ExportedProgram], capacity: int, policy: str,
                 n_layers: int, vocab_size: int) -> None:
        self.prefill_fn = programs["prefill"].module()
        self.decode_fn = programs["decode"].module()
        self.capacity, self.policy, self.n_layers, self.vocab_size = capacity, policy, n_layers, vocab_size

    @torch.no_grad()
    def _prefill(self, tokens, thresholds):
        return _split(self.prefill_fn(tokens, thresholds))

    @torch.no_grad()
    def _step(self, token, thresholds, state):
        return _split(self.decode_fn(token, thresholds, *state))

    def state_tensors(self, state):
        return list(state)


class AotiRunner(Runner):
    """An AOTInductor package (``ham-export native``): its ``prefill`` and ``decode`` models, loaded in this process.

    The compiled code indexes its inputs with the strides it was compiled for (contiguous), without checking them,
    so every input is made contiguous here; inputs go to the package's device and outputs come back to the CPU.
    """

    name = "aotinductor"

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        from torch._inductor.package import load_package

        from . import ops  # noqa: F401  (the compiled code calls torch.ops.ham.* through the dispatcher)

        self.device = torch.device(manifest.get("device", "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise mf.ArtifactError(f"{path} was compiled for CUDA; no CUDA GPU is visible to torch here")
        self.fns = {}
        for name in ("prefill", "decode"):
            try:
                self.fns[name] = load_package(str(path), model_name=manifest["programs"][name]["model_name"])
            except Exception as exc:  # a damaged archive surfaces as whatever its reader hit
                raise mf.ArtifactError(f"cannot load {name} from {path}: truncated or not an AOTInductor package "
                                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                                       ) from None
        self.capacity, self.policy = manifest["capacity"], manifest["policy"]
        self.n_layers, self.vocab_size = manifest["model"]["n_layers"], manifest["model"]["vocab_size"]
        self.manifest = manifest

    def _call(self, name: str, *inputs: torch.Tensor) -> tuple[Output, list[torch.Tensor]]:
        args = [x.to(self.device).contiguous() for x in inputs]
        with torch.no_grad():
            outputs = self.fns[name](*args)
        head, state = _split(outputs)
        return head.cpu(), state

    def _prefill(self, tokens, thresholds):
        return self._call("prefill", tokens, thresholds)

    def _step(self, token, thresholds, state):
        return self._call("decode", token, thresholds, *state)

    def state_tensors(self, state):
        return [x.cpu() for x in state]


# Decode may bind these state inputs and outputs to one buffer. It is safe because under the drop policy
# CacheAppend writes only slots at or past the old length, which nothing else in the step reads; the length itself
# is read by CacheAttention, which ONNX Runtime may schedule after CacheAppend, so it is never shared.
SHARED_FIELDS = ("k_cache", "v_cache", "score_cache")


class OrtRunner(Runner):
    """The ONNX programs in ONNX Runtime (CPU), with the ham.ai op library when the graph needs it.

    With ``share_buffers`` (custom-op graphs under the drop policy), decode binds each cache's input and output to
    one buffer, so that a step writes only the new entries instead of copying the cache. Under ``evict`` a full
    cache is overwritten below the old length, which the attention of the same step may still read, so decode
    copies.
    """

    name = "onnxruntime"

    def __init__(self, directory: Path, manifest: dict[str, Any], share_buffers: bool = True) -> None:
        import onnxruntime as ort

        self.capacity, self.policy = manifest["capacity"], manifest["policy"]
        self.n_layers, self.vocab_size = manifest["model"]["n_layers"], manifest["model"]["vocab_size"]
        self.manifest, self.dtype = manifest, manifest["dtype"]
        library = manifest.get("op_library")
        if library:
            from .ort_ops import session_options

            options = session_options()
        else:
            options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {}
        for name in ("prefill", "decode"):
            path = directory / manifest["programs"][name]["file"]
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ONNX Runtime raises its own classes for bad files and unknown ops
                raise mf.ArtifactError(f"ONNX Runtime cannot load {path}: {str(exc).strip()[:500]}") from None
        self.float_dtype = torch.float16 if manifest["dtype"] == "fp16" else torch.float32
        self.share_buffers = share_buffers and bool(library) and self.policy == "drop"
        self.past = state_names(self.n_layers, "past")
        self.present = state_names(self.n_layers, "present")
        log.info("onnxruntime runner: ops=%s, share_buffers=%s", manifest.get("ops"), self.share_buffers)

    @staticmethod
    def _torch(values) -> list[torch.Tensor]:
        return [torch.from_numpy(v) for v in values]

    def _prefill(self, tokens, thresholds):
        outputs = self.sessions["prefill"].run(None, {"tokens": tokens.numpy(), "thresholds": thresholds.numpy()})
        return _split(self._torch(outputs))

    def _step(self, token, thresholds, state):
        feeds = {"token": token.numpy(), "thresholds": thresholds.numpy()}
        feeds.update({name: tensor.numpy() for name, tensor in zip(self.past, state, strict=True)})
        if not self.share_buffers:
            return _split(self._torch(self.sessions["decode"].run(None, feeds)))
        return self._step_in_place(feeds, state)

    def _step_in_place(self, feeds, state):
        session = self.sessions["decode"]
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        fresh = [name for name in (*HEAD_OUTPUTS, *self.present) if name.rsplit(".", 1)[-1] not in SHARED_FIELDS]
        for name in fresh:  # bound first: get_outputs returns outputs in binding order
            binding.bind_output(name, "cpu")
        # Each cache is bound as both input and output: CacheAppend writes the new entries in place.
        for past, present in zip(self.past, self.present, strict=True):
            if present.rsplit(".", 1)[-1] in SHARED_FIELDS:
                value = feeds[past]
                binding.bind_output(present, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
        session.run_with_iobinding(binding)
        # Only the fresh outputs are read out; reading the shared caches would copy them.
        produced = {name: value.numpy() for name, value in zip(fresh, binding.get_outputs(), strict=False)}
        head = Output(*(torch.from_numpy(produced[name]) for name in HEAD_OUTPUTS))
        new_state = [tensor if present.rsplit(".", 1)[-1] in SHARED_FIELDS else torch.from_numpy(produced[present])
                     for present, tensor in zip(self.present, state, strict=True)]
        return head, new_state

    def state_tensors(self, state):
        return list(state)


class TvmRunner(Runner):
    """The TVM-compiled programs (``prefill.so``, ``decode.so``) in the Relax VM, on the CPU or a CUDA device.

    The state is a list of TVM tensors on the device. A decode step updates the caches of the state it is given in
    place (the TIR cache append writes only the new rows) and returns them in the new state, so a state must not be
    stepped twice; a state of torch tensors (from :meth:`state_tensors` or elsewhere) is copied to the device first
    and is never modified.
    """

    name = "tvm"

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        from .tvm_backend import load_programs

        self.capacity, self.policy = manifest["capacity"], manifest["policy"]
        self.n_layers, self.vocab_size = manifest["model"]["n_layers"], manifest["model"]["vocab_size"]
        self.manifest, self.dtype = manifest, manifest["dtype"]
        self.device, machines = load_programs(directory, manifest)
        self.prefill_fn, self.decode_fn = machines["prefill"]["main"], machines["decode"]["main"]
        self.state_inputs = manifest["programs"]["decode"]["inputs"][2:]
        log.info("tvm runner: target %s", manifest.get("target"))

    def _tensor(self, value: torch.Tensor):
        import tvm

        return tvm.runtime.tensor(value.detach().contiguous().cpu().numpy(), self.device)

    def _call(self, fn, args) -> tuple[Output, list]:
        outputs = list(fn(*args))
        head = Output(*(torch.from_numpy(t.numpy()) for t in outputs[: len(HEAD_OUTPUTS)]))
        return head, outputs[len(HEAD_OUTPUTS):]

    def _prefill(self, tokens, thresholds):
        return self._call(self.prefill_fn, [self._tensor(tokens), self._tensor(thresholds)])

    def _step(self, token, thresholds, state):
        state = list(state)
        if len(state) != len(self.state_inputs):
            raise InputError(f"a state has {len(self.state_inputs)} tensors (6 per layer), got {len(state)}")
        batch = token.shape[0]
        args = [self._tensor(token), self._tensor(thresholds)]
        for info, value in zip(self.state_inputs, state, strict=True):
            shape = [batch if d == "B" else d for d in info["shape"]]
            dtype = str(value.dtype).removeprefix("torch.")
            if list(value.shape) != shape or dtype != info["dtype"]:
                raise InputError(f"{info['name']} must be {info['dtype']} {shape}, got {dtype} {list(value.shape)}")
            args.append(self._tensor(value) if isinstance(value, torch.Tensor) else value)
        return self._call(self.decode_fn, args)

    def state_tensors(self, state):
        return [t if isinstance(t, torch.Tensor) else torch.from_numpy(t.numpy()) for t in state]


def load_runner(artifact: str | Path, share_buffers: bool = True) -> Runner:
    """The runner for an artifact folder (or a file in it), chosen by its manifest's backend."""
    directory, manifest = mf.read(artifact)
    backend = manifest["backend"]
    log.info("loading %s artifact from %s", backend, directory)
    if backend == "onnxruntime":
        return OrtRunner(directory, manifest, share_buffers)
    if backend == "tvm":
        return TvmRunner(directory, manifest)
    if backend == "aotinductor":
        return AotiRunner(directory / manifest["programs"]["prefill"]["file"], manifest)
    from . import ops  # noqa: F401  (the programs call torch.ops.ham.*)

    programs = {}
    for name in ("prefill", "decode"):
        path = directory / manifest["programs"][name]["file"]
        # torch.export.load logs a traceback before raising on a damaged file; the error below says it all.
        torch_log = logging.getLogger("torch.export")
        level = torch_log.level
        torch_log.setLevel(logging.CRITICAL)
        try:
            programs[name] = torch.export.load(path)
        except Exception as exc:  # a damaged archive surfaces as whatever its parser hit
            raise mf.ArtifactError(f"cannot load {path}: truncated or not a torch.export program "
                                   f"({type(exc).__name__}: {exc})") from None
        finally:
            torch_log.setLevel(level)
    model = manifest["model"]
    runner = ExportedProgramRunner(programs, manifest["capacity"], manifest["policy"], model["n_layers"],
                                   model["vocab_size"])
    runner.manifest = manifest
    return runner


def eager_runner_like(model: HAMLM, runner: Runner) -> EagerRunner:
    """The eager model with the artifact's capacity and policy, so that the two compare like with like."""
    return EagerRunner(model, runner.capacity, runner.policy)


__all__ = ["AotiRunner", "EagerRunner", "ExportedProgramRunner", "OrtRunner", "Output", "Runner", "TritonRunner",
           "TvmRunner", "load_runner", "unflatten_state"]
