"""The ONNX Runtime backend: ``prefill.onnx`` and ``decode.onnx``, run in ONNX Runtime on the CPU.

Three op forms (``--ops``, :mod:`ham_export.ops.onnx`): ``custom`` keeps the HAM ops as ``ham.ai`` nodes, run by
the op library of ``runtimes/onnxruntime`` (:data:`ham_export.ops.libraries.ORT`); ``standard`` lowers them to the
opset-27 ops ONNX standardized for this model family (LinearAttention, Attention, TensorScatter), run by a stock ONNX
Runtime >= 1.32; ``portable`` lowers them to opset-18 ops (Scan, Loop, ...), for runtimes without those. All pass
``onnx.checker`` with ``full_check``; the manifest records the form and its opset.

The runner keeps its state as numpy-backed CPU tensors. Under the drop policy, with the custom or the standard ops,
decode binds each cache's input and output to one buffer (IOBinding), so that a step writes only the new entries
(CacheAppend, or TensorScatter, in place) instead of copying the caches. Under ``evict`` a full cache is overwritten
below the old length, which the attention of the same step may still read, so decode copies; the length itself is
read by the attention, which ONNX Runtime may schedule after the append, so it is never shared.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.model import HAMLM
from ..errors import InputError
from ..ops.libraries import ORT
from ..ops.onnx import OPSETS
from ..ops.spec import ONNX_DOMAIN, ONNX_DOMAIN_VERSION
from . import artifact, register
from .base import Backend, Option, Output, Runner, split_outputs
from .manifest import ArtifactError, Manifest, Program
from .programs import HEAD_OUTPUTS, check_graph, export_programs, program_table, state_names

log = logging.getLogger(__name__)
NAME = "onnxruntime"
OPS_FORMS = ("custom", "standard", "portable")
IN_PLACE_FORMS = ("custom", "standard")
SHARED_FIELDS = ("k_cache", "v_cache", "score_cache")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(bool)": "bool"}


def build(model: HAMLM, out: str | Path, capacity: int, policy: str = "drop", source: str | Path | None = None,
          ops: str = "custom", dtype: str = "fp32") -> Path:
    """Write ``prefill.onnx``, ``decode.onnx`` and the manifest into ``out``; returns the folder."""
    artifact.check_options(capacity, policy, dtype)
    out = Path(out)
    programs = export_onnx(model, out, capacity, policy, ops, dtype)
    library = ORT.to_manifest(domain=ONNX_DOMAIN, version=ONNX_DOMAIN_VERSION) if ops == "custom" else None
    artifact.manifest(NAME, model, capacity, policy, dtype, programs, source, ops=ops, opset=OPSETS[ops],
                      op_library=library).write(out)
    log.info("wrote ONNX programs (%s ops, %s) to %s", ops, dtype, out)
    return out


def export_onnx(model: HAMLM, out: Path, capacity: int, policy: str, ops: str, dtype: str,
                files: dict[str, str] | None = None) -> dict[str, Program]:
    """Export both programs to ONNX files in ``out`` (``files``: their names, default ``<program>.onnx``), each
    with its dynamic dims named as the manifest names them and checked by ``onnx.checker``; returns the programs'
    table. Shared with the TensorRT backend, which rewrites the custom-op form."""
    import onnx

    from ..ops.onnx import export_options, finish, register_schemas

    if ops not in OPS_FORMS:
        raise InputError(f"--ops must be one of {', '.join(OPS_FORMS)}, got {ops!r}")
    out.mkdir(parents=True, exist_ok=True)
    register_schemas()
    cast = model if dtype == "fp32" else artifact.cast_copy(model, artifact.DTYPES[dtype])
    n = model.cfg.n_layers
    names = {
        "prefill": (["tokens", "thresholds"], [*HEAD_OUTPUTS, *state_names(n, "present")]),
        "decode": (["token", "thresholds", *state_names(n, "past")], [*HEAD_OUTPUTS, *state_names(n, "present")]),
    }
    large = model.num_parameters() * artifact.DTYPES[dtype].itemsize > (1 << 30)
    files = files or {name: f"{name}.onnx" for name in names}
    for name, program in export_programs(cast, capacity, policy).items():
        inputs, outputs = names[name]
        with artifact.quiet_exporter():
            onnx_program = torch.onnx.export(program, f=None, dynamo=True, input_names=inputs,
                                             output_names=outputs, verbose=False, optimize=True,
                                             **export_options(ops))
        finish(onnx_program.model, ops)
        onnx_program.save(str(out / files[name]), external_data=large)
    programs = program_table(model, capacity, dtype, files)
    for name, program in programs.items():
        name_dynamic_dims(out / files[name], program)
        onnx.checker.check_model(str(out / files[name]), full_check=True)
    return programs


def name_dynamic_dims(path: Path, program) -> None:
    """Name the graph's dynamic dims as the manifest does (``B``, ``T``) instead of the exporter's ``s52``: on the
    inputs, the outputs and every value that carries the same symbol."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    rename: dict[str, str] = {}
    for value, info in zip([*graph.input, *graph.output], [*program.inputs, *program.outputs], strict=True):
        for dim, symbol in zip(value.type.tensor_type.shape.dim, info.shape, strict=True):
            if isinstance(symbol, str) and dim.HasField("dim_param"):
                rename.setdefault(dim.dim_param, symbol)
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    onnx.save(model, str(path))


def op_form(manifest: Manifest) -> str:
    """The artifact's op form. ``standard`` with no ``opset`` is a manifest written before the opset-27 form: its
    graph is the opset-18 form, now called ``portable``."""
    ops = manifest.options.get("ops") or "custom"
    return "portable" if ops == "standard" and manifest.options.get("opset") is None else ops


def shares_caches(manifest: Manifest) -> bool:
    """Whether decode binds each cache as both input and output (the module docstring says when)."""
    return op_form(manifest) in IN_PLACE_FORMS and manifest.policy == "drop"


class OrtRunner(Runner):
    """The ONNX programs in ONNX Runtime (CPU), with the ``ham.ai`` op library when the graph needs it."""

    name = NAME

    def __init__(self, manifest: Manifest, share_buffers: bool = True) -> None:
        super().__init__(manifest)
        self.sessions: dict = {}
        self.uses_library = manifest.options.get("op_library") is not None
        self.share_buffers = share_buffers and shares_caches(manifest)
        self.past = state_names(self.n_layers, "past")
        self.present = state_names(self.n_layers, "present")

    def _load(self) -> None:
        import onnxruntime as ort

        if self.uses_library:
            from ..ops.libraries import ort_session_options

            options = ort_session_options()
        else:
            options = ort.SessionOptions()
        options.log_severity_level = 3
        for name in ("prefill", "decode"):
            path = self.manifest.path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ONNX Runtime raises its own classes for bad files and unknown ops
                raise ArtifactError(f"ONNX Runtime cannot load {path}: {str(exc).strip()[:500]}") from None
            session = self.sessions[name]
            check_graph(self.manifest, name, *([(v.name, _ORT_TYPES.get(v.type, v.type), v.shape) for v in values]
                                               for values in (session.get_inputs(), session.get_outputs())))
        log.info("onnxruntime runner: ops=%s, share_buffers=%s", op_form(self.manifest), self.share_buffers)

    def _release(self) -> None:
        self.sessions = {}

    @staticmethod
    def _torch(values) -> list[torch.Tensor]:
        return [torch.from_numpy(v) for v in values]

    def _prefill(self, tokens, thresholds):
        outputs = self.sessions["prefill"].run(None, {"tokens": tokens.numpy(), "thresholds": thresholds.numpy()})
        return split_outputs(self._torch(outputs))

    def _step(self, token, thresholds, state):
        state = list(state)
        if len(state) != len(self.past):
            raise InputError(f"a state has {len(self.past)} tensors (6 per layer), got {len(state)}")
        feeds = {"token": token.numpy(), "thresholds": thresholds.numpy()}
        feeds.update({name: tensor.detach().cpu().contiguous().numpy()
                      for name, tensor in zip(self.past, state, strict=True)})
        if not self.share_buffers:
            return split_outputs(self._torch(self.sessions["decode"].run(None, feeds)))
        return self._step_in_place(feeds, state)

    def _step_in_place(self, feeds, state):
        session = self.sessions["decode"]
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        fresh = [name for name in (*HEAD_OUTPUTS, *self.present) if name.rsplit(".", 1)[-1] not in SHARED_FIELDS]
        for name in fresh:  # bound first: get_outputs returns outputs in binding order
            binding.bind_output(name, "cpu")
        # Each cache is bound as both input and output: CacheAppend (or TensorScatter) writes the new entries in
        # place.
        for past, present in zip(self.past, self.present, strict=True):
            if present.rsplit(".", 1)[-1] in SHARED_FIELDS:
                value = feeds[past]
                binding.bind_output(present, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
        session.run_with_iobinding(binding)
        # Only the fresh outputs are read out; reading the shared caches would copy them.
        produced = {name: value.numpy() for name, value in zip(fresh, binding.get_outputs(), strict=False)}
        head = Output(*(torch.from_numpy(produced[name]) for name in HEAD_OUTPUTS))
        new_state = [torch.from_numpy(feeds[past]) if present.rsplit(".", 1)[-1] in SHARED_FIELDS
                     else torch.from_numpy(produced[present])
                     for past, present in zip(self.past, self.present, strict=True)]
        return head, new_state

    def state_tensors(self, state):
        return [x.detach().cpu() for x in state]


def custom_ops_missing() -> str | None:
    """Why the custom-op form cannot run here (ONNX Runtime or the op library missing), or None."""
    reason = _requires()
    if reason is None and not ORT.path().is_file():
        reason = f"the ONNX Runtime op library is not built at {ORT.path()} ({ORT.build})"
    return reason


def _requires() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'ham-export[onnx]')"
    return None


BACKEND = register(Backend(
    name=NAME, command="onnx", summary="ONNX programs for ONNX Runtime (prefill.onnx, decode.onnx)",
    build=build, runner=OrtRunner, requires=_requires,
    options=(
        Option("ops", "--ops", "custom", "custom: ham.ai nodes run by the op library of runtimes/onnxruntime; "
                                         "standard: opset-27 ONNX ops only (LinearAttention, Attention, "
                                         "TensorScatter), no op library; portable: opset-18 ops only, for runtimes "
                                         "without opset 27.", OPS_FORMS),
        Option("dtype", "--dtype", "fp32", "The dtype of the weights, activations and state.", ("fp32", "fp16")),
    ),
    manifest_keys={"ops": str, "opset": int, "op_library": dict},
    memory="ONNX Runtime (CPU): state + the step's activations, + a transient copy of the caches when they are not "
           "shared in place (see ham_export.memory.sizes.ort_decode_workspace_bytes); weights once per program",
))
