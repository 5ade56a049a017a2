"""Every implementation of every HAM op, behind one interface, so that each op's tests are written once.

An :class:`Impl` runs one op on a list of torch tensors in spec order (and the spec's attributes) and returns the
outputs of the functional op, as CPU torch tensors; an in-place implementation (``in_place``) also has
:meth:`Impl.write`, which writes into the tensors it is given and returns the rest. Errors of every runtime become
:class:`ImplError` with the runtime's message. Implementations that this machine cannot run say why
(:meth:`Impl.unavailable`), and the tests skip them with that reason.

``refuses_on_device``: the implementation runs where it cannot read the lengths without a synchronisation (a
compiled kernel, a graph), so a length outside [0, C] is refused in the kernel, as the op spec says (no write,
overflow -1, NaN attention), not raised. ``host_check=False`` makes the Triton launchers skip their host check, so
that their in-kernel refusal is tested under the interpreter.

The implementations: ``reference`` (and its in-place form), ``torch-op`` (``torch.ops.ham`` on the CPU, and
``ham::cache_append_``), ``ort`` (the ONNX Runtime op library, a one-node model; in place: caches bound as input and
output), ``onnx-portable`` and ``onnx-standard`` (the opset-18 and opset-27 ONNX translations in ONNX Runtime,
dynamic T; ``onnx-standard-decode``: the opset-27 one-token forms, static T = 1, which read the cache where it lies
and so get finite values past the length instead of NaN, see :data:`FINITE_TAIL`), ``libtorch`` (the libtorch op
library, in a worker process that never imports ham_export; and its in-place op), ``triton`` (the kernels under
``TRITON_INTERPRET=1``; decode and prompt attention kernels apart; the append functional and in place), ``tir``
(the TVM TIR kernels compiled for llvm; the append in place), ``trt-launch`` (the TensorRT plugins' entry kernels
in TensorRT's ABI, :mod:`ham_export.plugins_trt.launch`, launched by Triton under the interpreter; the append with
its caches as aliased outputs, and in place).
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ham_export.ops import reference as ref
from ham_export.ops.libraries import ORT
from ham_export.ops.spec import CACHE_APPEND, CACHE_ATTENTION, GDN_PREFILL, ONNX_DOMAIN, ONNX_DOMAIN_VERSION, OPS

ROOT = Path(__file__).resolve().parents[2]
SPECS = {spec.torch_name: spec for spec in OPS}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FP32_FP16 = (torch.float32, torch.float16)


class ImplError(Exception):
    """An implementation refused a call; the message is the runtime's own."""


@dataclass(frozen=True)
class Impl:
    name: str
    op: str
    call: Callable  # (inputs, attributes, host_check) -> outputs
    dtypes: tuple[torch.dtype, ...] = FLOATS
    in_place: bool = False
    host_checks: bool = True  # raises on a bad length when called with host_check=True
    refuses_on_device: bool = False  # refuses a bad length in the kernel (called with host_check=False)
    requires: Callable[[], str | None] = lambda: None
    accepts: Callable[[dict], str | None] = lambda dims: None

    def __str__(self) -> str:
        return self.name

    def unavailable(self) -> str | None:
        return self.requires()

    def rejects(self, case) -> str | None:
        """Why this implementation does not take this case (a dtype or a shape it has no kernel for), or None."""
        if case.dtype not in self.dtypes:
            return f"{self.name} has no {str(case.dtype).removeprefix('torch.')} kernel"
        return self.accepts(case.dims)

    def run(self, inputs: list[torch.Tensor], attributes: dict | None = None, host_check: bool = True
            ) -> list[torch.Tensor]:
        """The functional op's outputs (an in-place implementation runs on copies of the caches)."""
        attributes = attributes or {}
        if self.in_place:
            inputs = [x.clone() for x in inputs]
            overflow = self.write(inputs, attributes, host_check)
            return [*inputs[:4], overflow]
        return self._call(inputs, attributes, host_check)

    def write(self, inputs: list[torch.Tensor], attributes: dict | None = None, host_check: bool = True
              ) -> torch.Tensor:
        """In-place implementations: write the caches and length (inputs 0-3) in place; returns overflow."""
        assert self.in_place, self.name
        return self._call(inputs, attributes or {}, host_check)

    def _call(self, inputs, attributes, host_check):
        try:
            return self.call(inputs, attributes, host_check)
        except ImplError:
            raise
        except Exception as exc:  # every runtime raises its own classes
            raise ImplError(str(exc)) from None


def _tuple(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _attrs(spec, attributes) -> list[str]:
    return [attributes[a.name] for a in spec.attributes]


# ---------------------------------------------------------------------------------------------- reference, torch


def _reference(op):
    fn = ref.gdn_chunked if op == "gdn_prefill" else getattr(ref, op)
    return lambda inputs, attributes, _: _tuple(fn(*inputs, *_attrs(SPECS[op], attributes)))


def _torch_op(name, spec):
    def call(inputs, attributes, _):
        from ham_export.ops import library

        out = getattr(library, name)(*inputs, *_attrs(spec, attributes))
        return out if name.endswith("_") else _tuple(out)  # an in-place form returns its overflow alone
    return call


# ------------------------------------------------------------------------------------------------ ONNX Runtime


def _onnxruntime_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


def _ort_library_missing() -> str | None:
    if _onnxruntime_missing():
        return _onnxruntime_missing()
    return None if ORT.path().is_file() else f"the ONNX Runtime op library is not built at {ORT.path()} ({ORT.build})"


_ELEM = {torch.float32: 1, torch.float16: 10}  # onnx TensorProto FLOAT, FLOAT16


@functools.cache
def _ort_node_session(op: str, dtype: torch.dtype, policy: str | None):
    """A one-node model of the op in domain ham.ai, in ONNX Runtime with the library. The inputs carry no shape, so
    that every shape check is the kernel's own (ONNX Runtime checks only the dtypes)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ham_export.ops.libraries import ort_session_options

    spec = SPECS[op]
    elem = {"T": _ELEM[dtype], "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
    node = helper.make_node(spec.name, list(spec.input_names), [a.name for a in spec.outputs], domain=ONNX_DOMAIN,
                            **({"policy": policy} if policy else {}))

    def info(arg):
        return helper.make_tensor_value_info(arg.name, elem[arg.dtype], None)

    graph = helper.make_graph([node], spec.name, [info(a) for a in spec.inputs], [info(a) for a in spec.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)])
    options = ort_session_options()
    options.intra_op_num_threads = 2  # exercises the kernels' ParallelFor
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(spec, inputs) -> dict[str, np.ndarray]:
    return {name: x.numpy() for name, x in zip(spec.input_names, inputs, strict=True)}


def _ort(op):
    def call(inputs, attributes, _):
        session = _ort_node_session(op, inputs[0].dtype, attributes.get("policy"))
        return [torch.from_numpy(np.asarray(x)) for x in session.run(None, _feeds(SPECS[op], inputs))]
    return call


def _ort_in_place(inputs, attributes, _):
    """CacheAppend with each cache (and the length) bound as both input and output: written where it lies."""
    session = _ort_node_session("cache_append", inputs[0].dtype, attributes["policy"])
    binding = session.io_binding()
    feeds = _feeds(CACHE_APPEND, inputs)
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name, out in (("k_cache", "k_cache_out"), ("v_cache", "v_cache_out"), ("score_cache", "score_cache_out"),
                      ("length", "length_out")):
        value = feeds[name]
        binding.bind_output(out, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
    binding.bind_output("overflow", "cpu")
    session.run_with_iobinding(binding)
    return torch.from_numpy(binding.get_outputs()[-1].numpy())


_DIM = {"B": "batch", "T": "tokens", "C": "capacity"}


class _OpModule(torch.nn.Module):
    def __init__(self, op: str, attributes: tuple[str, ...]) -> None:
        super().__init__()
        self.op, self.attributes = op, attributes

    def forward(self, *inputs):
        return getattr(torch.ops.ham, self.op)(*inputs, *self.attributes)


@functools.cache
def _onnx_session(form: str, op: str, dtype: torch.dtype, policy: str | None, hkv: tuple[int, int, int],
                  static_t: int | None = None):
    """The ``form`` translation of one op, exported with dynamic B and C (and T unless ``static_t``); H, K and V
    are static, as in a model's graph."""
    import onnxruntime as ort

    from ham_export.ops.onnx import export_ops_model
    from tests.ops.inputs import BUILDERS

    spec = SPECS[op]
    t = static_t or 5
    h, k, v = hkv
    example = (BUILDERS[op](2, t, h, k, v) if op == "gdn_prefill" else BUILDERS[op](2, h, t, 6, k, v))
    example = [x.to(dtype) if x.is_floating_point() else x for x in example]
    dims = {letter: torch.export.Dim(name) for letter, name in _DIM.items() if not (letter == "T" and static_t)}
    shapes = tuple({i: dims[letter] for i, letter in enumerate(arg.shape) if letter in dims} or None
                   for arg in spec.inputs)
    attributes = (policy,) if policy else ()
    model = export_ops_model(_OpModule(op, attributes).eval(), tuple(example), form, (shapes,))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


FINITE_TAIL = 50.0
"""What the one-token standard attention finds past each cache's length instead of NaN: it multiplies those entries
by exactly zero weights, so they must be finite (the form's stated contract); a value this large would dominate
the output if one were ever weighted."""


def _onnx(form: str, op: str, static_t: int | None = None):
    def call(inputs, attributes, _):
        d = SPECS[op].check(inputs, attributes, values=False)
        session = _onnx_session(form, op, inputs[0].dtype, attributes.get("policy"), (d["H"], d["K"], d["V"]),
                                static_t)
        if static_t and op == "cache_attention":
            inputs = [x.nan_to_num(nan=FINITE_TAIL) if x.is_floating_point() else x for x in inputs]
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
        return [torch.from_numpy(np.asarray(x)) for x in session.run(None, feeds)]
    return call


# ------------------------------------------------------------------------------------------------------ libtorch

LIBTORCH = ROOT / "build" / "libtorch" / "libham_torch_ops.so"

# Reads (op name, args) pickles from stdin and answers ("ok", outputs) or ("error", type name, message); the op
# name "_schema" asks for an op's schema string, "_inplace" runs an in-place op and sends back the tensors it wrote
# (a view comes back with all of its storage, so that a write past the view shows). Two intra-op threads exercise the
# kernels' at::parallel_for.
WORKER = r"""
import pickle, sys
import torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(2)
assert not any(name.startswith("ham_export") for name in sys.modules), "the worker must not import ham_export"
requests, replies = sys.stdin.buffer, sys.stdout.buffer
while True:
    try:
        name, args = pickle.load(requests)
    except EOFError:
        break
    try:
        if name == "_schema":
            reply = ("ok", str(getattr(torch.ops.ham, args[0]).default._schema))
        elif name == "_inplace":
            op, call, written = args
            reply = ("ok", (getattr(torch.ops.ham, op)(*call), call[:written]))
        else:
            reply = ("ok", getattr(torch.ops.ham, name)(*args))
    except Exception as exc:
        reply = ("error", type(exc).__name__, str(exc))
    pickle.dump(reply, replies)
    replies.flush()
"""


class Worker:
    """A Python subprocess with the libtorch op library loaded: ``call(op, *args)`` runs ``torch.ops.ham.<op>``."""

    def __init__(self, library: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(library)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def call(self, op: str, *args):
        try:
            pickle.dump((op, args), self.proc.stdin)
            self.proc.stdin.flush()
            reply = pickle.load(self.proc.stdout)
        except (BrokenPipeError, EOFError):
            self.proc.kill()
            raise AssertionError(f"the op worker died: {self.proc.stderr.read().decode()}") from None
        if reply[0] == "error":
            raise ImplError(reply[2])
        return reply[1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@functools.cache
def libtorch_worker() -> Worker:
    worker = Worker(LIBTORCH)
    atexit.register(worker.close)
    return worker


def _libtorch_missing() -> str | None:
    return None if LIBTORCH.is_file() else f"the libtorch op library is not built at {LIBTORCH} " \
                                           f"(bash scripts/build-torch-ops.sh)"


def _libtorch(op):
    def call(inputs, attributes, _):
        return _tuple(libtorch_worker().call(op, *inputs, *_attrs(SPECS[op], attributes)))
    return call


def _libtorch_in_place(inputs, attributes, _):
    """ham::cache_append_ in the worker; the written tensors come back with their whole storage (a pickled view
    carries it), which is copied over the caller's, so that a write past a view into a guarded buffer shows."""
    overflow, written = libtorch_worker().call("_inplace", "cache_append_", (*inputs, attributes["policy"]), 4)
    for x, w in zip(inputs[:4], written, strict=True):
        holder = x._base if x._base is not None else x
        storage = torch.empty(0, dtype=w.dtype).set_(w.untyped_storage())
        holder.view(-1).copy_(storage[: holder.numel()])
    return overflow


# -------------------------------------------------------------------------------------------------------- Triton


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'ham-export[triton]')"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels run on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)"
    return None


def _kernel(module: str):
    import importlib

    return importlib.import_module(f"ham_export.kernels.{module}")


def _values(host_check: bool) -> bool | None:
    return None if host_check else False


def _triton_decode(inputs, attributes, host_check):
    ka = _kernel("cache_attention")
    return [ka._decode(*inputs, ka.BLOCK_C, ka.MAX_SPLITS, values=_values(host_check))]


def _triton_prefill(inputs, attributes, host_check):
    kp = _kernel("prefill_attention")
    return [kp._prefill(*inputs, kp.BLOCK_T, kp.BLOCK_C, kp.BLOCK_S, kp.COMPACT_BLOCK, values=_values(host_check))]


def _triton_append(inputs, attributes, host_check):
    inputs = [x.clone() for x in inputs]
    overflow = _triton_append_in_place(inputs, attributes, host_check)
    return [*inputs[:4], overflow]


def _triton_append_in_place(inputs, attributes, host_check):
    return _kernel("cache_append")._append(*inputs, attributes["policy"], values=_values(host_check))


def _triton_gdn(inputs, attributes, _):
    return list(_kernel("gdn").gdn_chunked(*inputs))


# ------------------------------------------------------------------------------------ TensorRT plugin kernels


def _trt_launch_call(op: str, inputs, outputs, attributes) -> None:
    """The op's TensorRT plugin kernel (the QDP's entry kernel, in TensorRT's ABI) launched by Triton under the
    interpreter: routed as int32, every tensor contiguous, as TensorRT hands them to a plugin."""
    from ham_export.plugins_trt.launch import launch_for

    inputs = [x.to(torch.int32) if x.dtype == torch.bool else x for x in inputs]
    launch_for(SPECS[op].name, inputs, attributes or None, interpreted=True).run(inputs, outputs, attributes or None)


def _empty_like_outputs(op: str, inputs) -> list[torch.Tensor]:
    """The op's outputs, empty (sizes from the inputs where they agree; a bad input fails the launch's check)."""
    spec = SPECS[op]
    d = {letter: size for arg, x in zip(spec.inputs, inputs, strict=False) for letter, size in zip(arg.shape, x.shape,
                                                                                                   strict=False)}
    return [torch.empty([d.get(letter, 1) for letter in arg.shape],
                        dtype=inputs[0].dtype if arg.dtype == "T" else torch.int64) for arg in spec.outputs]


def _trt_launch(op):
    def call(inputs, attributes, _):
        inputs = [x.contiguous() for x in inputs]
        if op == "cache_append":  # the caches are aliased outputs: the output buffers hold the inputs
            outputs = [x.clone() for x in inputs[:3]] + [torch.empty_like(inputs[3]) for _ in range(2)]
        else:
            outputs = _empty_like_outputs(op, inputs)
        _trt_launch_call(op, inputs, outputs, attributes)
        return outputs
    return call


def _trt_launch_in_place(inputs, attributes, _):
    """CacheAppend with each cache bound as its own output (one buffer, as TensorRT binds an aliased output); the
    length comes back as a separate output and is copied over the input's."""
    caches = [x if x.is_contiguous() else x.contiguous() for x in inputs[:3]]
    rest = [x.contiguous() for x in inputs[3:]]
    length_out, overflow = torch.empty_like(inputs[3]), torch.empty_like(inputs[3])
    _trt_launch_call("cache_append", [*caches, *rest], [*caches, length_out, overflow], attributes)
    for given, used in zip(inputs[:3], caches, strict=True):
        if given is not used:
            given.copy_(used)
    inputs[3].copy_(length_out)
    return overflow


# ----------------------------------------------------------------------------------------------------------- TIR


def _tvm_missing() -> str | None:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return "apache-tvm is not installed (pip install 'ham-export[tvm]')"
    return None


@functools.cache
def _tir_function(op: str, key: tuple):
    """The op's TIR kernel compiled for llvm (kernels are specialised on H, C, K, V and the policy)."""
    import tvm

    from ham_export.ops import tir

    kernel = {"cache_attention": tir.cache_attention_kernel, "cache_append": tir.cache_append_kernel,
              "gdn_prefill": tir.gdn_prefill_kernel}[op](*key, False)
    return tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target="llvm")["main"]


def _tvm(x: torch.Tensor):
    import tvm

    return tvm.runtime.from_dlpack(x)  # shares the tensor's memory


def _tir(op):
    def call(inputs, attributes, _):
        d = SPECS[op].check(inputs, attributes, values=False)
        if op == "cache_attention":
            out = [torch.empty(d["B"], d["H"], d["T"], d["V"])]
            key = (d["H"], d["C"], d["K"], d["V"])
        else:
            out = [torch.empty(d["B"], d["T"], d["H"], d["V"]), torch.empty(d["B"], d["T"], d["H"], d["V"]),
                   torch.empty(d["B"], d["H"], d["K"], d["V"])]
            key = (d["H"], d["K"], d["V"])
        _tir_function(op, key)(*(_tvm(x.contiguous()) for x in (*inputs, *out)))
        return out
    return call


def _tir_append_in_place(inputs, attributes, _):
    d = CACHE_APPEND.check(inputs, attributes, values=False)
    length_out, overflow = torch.empty(d["B"], dtype=torch.int64), torch.empty(d["B"], dtype=torch.int64)
    fn = _tir_function("cache_append", (d["H"], d["C"], d["K"], d["V"], attributes["policy"]))
    fn(*(_tvm(x) for x in (*inputs, length_out, overflow)))
    inputs[3].copy_(length_out)
    return overflow


# -------------------------------------------------------------------------------------------------------- table


def _one_token(dims):
    return None if dims["T"] == 1 else "the decode kernel takes one new token (T = 1)"


IMPLEMENTATIONS: dict[str, list[Impl]] = {
    "cache_attention": [
        Impl("reference", "cache_attention", _reference("cache_attention")),
        Impl("torch-op", "cache_attention", _torch_op("cache_attention", CACHE_ATTENTION)),
        Impl("ort", "cache_attention", _ort("cache_attention"), FP32_FP16, requires=_ort_library_missing),
        Impl("onnx-portable", "cache_attention", _onnx("portable", "cache_attention"), FP32_FP16,
             host_checks=False, refuses_on_device=True, requires=_onnxruntime_missing),
        Impl("onnx-standard", "cache_attention", _onnx("standard", "cache_attention"), FP32_FP16,
             host_checks=False, refuses_on_device=True, requires=_onnxruntime_missing),
        Impl("onnx-standard-decode", "cache_attention", _onnx("standard", "cache_attention", static_t=1), FP32_FP16,
             host_checks=False, refuses_on_device=True, requires=_onnxruntime_missing, accepts=_one_token),
        Impl("libtorch", "cache_attention", _libtorch("cache_attention"), FP32_FP16, requires=_libtorch_missing),
        Impl("triton-decode", "cache_attention", _triton_decode, refuses_on_device=True, requires=_triton_missing,
             accepts=_one_token),
        Impl("triton-prefill", "cache_attention", _triton_prefill, refuses_on_device=True, requires=_triton_missing),
        Impl("tir", "cache_attention", _tir("cache_attention"), (torch.float32,), host_checks=False,
             refuses_on_device=True, requires=_tvm_missing),
        Impl("trt-launch", "cache_attention", _trt_launch("cache_attention"), host_checks=False,
             refuses_on_device=True, requires=_triton_missing),
    ],
    "cache_append": [
        Impl("reference", "cache_append", _reference("cache_append")),
        Impl("reference-in-place", "cache_append", lambda i, a, _: ref.cache_append_(*i, a["policy"]),
             in_place=True),
        Impl("torch-op", "cache_append", _torch_op("cache_append", CACHE_APPEND)),
        Impl("torch-op-in-place", "cache_append", _torch_op("cache_append_", CACHE_APPEND), in_place=True),
        Impl("ort", "cache_append", _ort("cache_append"), FP32_FP16, requires=_ort_library_missing),
        Impl("ort-in-place", "cache_append", _ort_in_place, FP32_FP16, in_place=True,
             requires=_ort_library_missing),
        Impl("onnx-portable", "cache_append", _onnx("portable", "cache_append"), FP32_FP16, host_checks=False,
             refuses_on_device=True, requires=_onnxruntime_missing),
        Impl("onnx-standard", "cache_append", _onnx("standard", "cache_append"), FP32_FP16, host_checks=False,
             refuses_on_device=True, requires=_onnxruntime_missing),
        Impl("onnx-standard-decode", "cache_append", _onnx("standard", "cache_append", static_t=1), FP32_FP16,
             host_checks=False, refuses_on_device=True, requires=_onnxruntime_missing, accepts=_one_token),
        Impl("libtorch", "cache_append", _libtorch("cache_append"), FP32_FP16, requires=_libtorch_missing),
        Impl("libtorch-in-place", "cache_append", _libtorch_in_place, FP32_FP16, in_place=True,
             requires=_libtorch_missing),
        Impl("triton", "cache_append", _triton_append, refuses_on_device=True, requires=_triton_missing),
        Impl("triton-in-place", "cache_append", _triton_append_in_place, in_place=True, refuses_on_device=True,
             requires=_triton_missing),
        Impl("tir-in-place", "cache_append", _tir_append_in_place, (torch.float32,), in_place=True,
             host_checks=False, refuses_on_device=True, requires=_tvm_missing),
        Impl("trt-launch", "cache_append", _trt_launch("cache_append"), host_checks=False, refuses_on_device=True,
             requires=_triton_missing),
        Impl("trt-launch-in-place", "cache_append", _trt_launch_in_place, in_place=True, host_checks=False,
             refuses_on_device=True, requires=_triton_missing),
    ],
    "gdn_prefill": [
        Impl("reference", "gdn_prefill", _reference("gdn_prefill")),
        Impl("torch-op", "gdn_prefill", _torch_op("gdn_prefill", GDN_PREFILL)),
        Impl("ort", "gdn_prefill", _ort("gdn_prefill"), FP32_FP16, requires=_ort_library_missing),
        Impl("onnx-portable", "gdn_prefill", _onnx("portable", "gdn_prefill"), FP32_FP16,
             requires=_onnxruntime_missing),
        Impl("onnx-standard", "gdn_prefill", _onnx("standard", "gdn_prefill"), FP32_FP16,
             requires=_onnxruntime_missing),
        Impl("libtorch", "gdn_prefill", _libtorch("gdn_prefill"), FP32_FP16, requires=_libtorch_missing),
        Impl("triton", "gdn_prefill", _triton_gdn, requires=_triton_missing),
        Impl("tir", "gdn_prefill", _tir("gdn_prefill"), (torch.float32,), requires=_tvm_missing),
        Impl("trt-launch", "gdn_prefill", _trt_launch("gdn_prefill"), requires=_triton_missing),
    ],
}
