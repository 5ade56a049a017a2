"""The HAM ops as ``torch.library`` ops, ``torch.ops.ham.*``, made from their specs (:mod:`ham_export.ops.spec`).

Each op has a functional form, ``ham::<op>``, which returns new state and never mutates its inputs (what
``torch.export`` and the ONNX exporter need), and ``cache_append`` also an in-place form, ``ham::cache_append_``,
whose schema marks the caches it writes (``Tensor(a!)``): runtimes that keep their state in place (the Triton runner,
a compiled decode) call it, so that a step writes only the new cache entries.

The schemas and the fake kernels come from the specs: a fake kernel runs :meth:`OpSpec.check` with ``torch._check``,
so a wrong shape or dtype fails at export time, not in an engine, and makes the outputs from the spec's letters.

Kernels, chosen per call by the device of the inputs (:func:`select_kernel`):

- CPU: the plain-PyTorch reference of :mod:`ham_export.ops.reference`;
- CUDA: the Triton kernels of :mod:`ham_export.kernels` (:data:`TRITON_KERNELS`).

The choice is logged once per (op, kernel) on logger ``ham_export.ops.library``; a Triton that cannot be imported is
a :class:`KernelUnavailableError`, never a silent switch; ``HAM_FORCE_REFERENCE=1`` runs the reference on every
device; :func:`triton_on_cpu` runs the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, which is how the
CUDA path is tested on a machine without a GPU.

Importing this module registers the ops once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import HamError
from . import reference as ref
from . import spec as specs

log = logging.getLogger(__name__)
FORCE_REFERENCE = "HAM_FORCE_REFERENCE"
KERNEL_PACKAGE = "ham_export.kernels"

try:
    _lib = torch.library.Library(specs.TORCH_NAMESPACE, "DEF")
except RuntimeError:  # the namespace exists: most likely libham_torch_ops.so was loaded into this process first
    raise HamError("the ham ops are already registered in this process (was runtimes/libtorch's "
                   "libham_torch_ops.so loaded?); ham_export.ops.library registers them for Python, the C++ library "
                   "is for C++ processes: load one or the other") from None


class KernelUnavailableError(HamError):
    """A call of a ham op whose Triton kernel cannot be imported or run here."""


# op name -> (spec, in place?) for every registered form
FORMS: dict[str, tuple[specs.OpSpec, bool]] = {}
for _spec in specs.OPS:
    _lib.define(f"{_spec.torch_name}{_spec.torch_schema()}")
    FORMS[_spec.torch_name] = (_spec, False)
    if _spec.inplace is not None:
        _lib.define(f"{_spec.inplace.name}{_spec.inplace_schema()}")
        FORMS[_spec.inplace.name] = (_spec, True)

REFERENCES: dict[str, Callable] = {"cache_attention": ref.cache_attention, "cache_append": ref.cache_append,
                                   "cache_append_": ref.cache_append_, "gdn_prefill": ref.gdn_chunked}

# op -> [(condition on the call's arguments, "module:function")]: the first entry that applies runs the call.
TRITON_KERNELS: dict[str, list[tuple[Callable[..., bool], str]]] = {
    "cache_attention": [(lambda q, *_: q.shape[2] == 1, "cache_attention:cache_attention_decode"),
                        (lambda *_: True, "prefill_attention:prefill_attention")],
    "cache_append": [(lambda *_: True, "cache_append:cache_append")],
    "cache_append_": [(lambda *_: True, "cache_append:cache_append_")],
    "gdn_prefill": [(lambda *_: True, "gdn:gdn_chunked")],
}
_logged: set[tuple[str, str]] = set()
_triton_on_cpu = False


def force_reference() -> bool:
    """Whether ``HAM_FORCE_REFERENCE`` asks for the plain-PyTorch reference on every device."""
    return os.environ.get(FORCE_REFERENCE, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Run the ops' Triton kernels on CPU tensors while inside (Triton's interpreter, ``TRITON_INTERPRET=1``)."""
    global _triton_on_cpu
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelUnavailableError("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 "
                                     "(Triton's interpreter)")
    saved, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = saved


@functools.cache
def load_kernel(op: str, target: str) -> Callable:
    """The function named by ``"module:function"`` in :mod:`ham_export.kernels`, imported once."""
    module_name, fn_name = target.split(":")
    try:
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{module_name}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "triton":
            raise  # a bug in the kernel module, not a missing Triton
        raise KernelUnavailableError(
            f"ham::{op} runs the Triton kernel {KERNEL_PACKAGE}.{target} here, which cannot be imported ({exc}); "
            f"install triton (pip install 'ham-export[triton]') or set {FORCE_REFERENCE}=1 for the plain-PyTorch "
            f"reference") from None
    return getattr(module, fn_name)


def select_kernel(op: str, device: str, *args: Any) -> tuple[str, Callable]:
    """(label, function) that runs ``ham::<op>`` for these arguments on a ``device`` ("cpu" or "cuda"). Logs the
    choice the first time it is made for each (op, label)."""
    if force_reference():
        label, fn = f"reference ({FORCE_REFERENCE} is set)", REFERENCES[op]
    elif device == "cuda" or _triton_on_cpu:
        target = next(target for applies, target in TRITON_KERNELS[op] if applies(*args))
        label, fn = f"Triton {KERNEL_PACKAGE}.{target}", load_kernel(op, target)
    else:
        label, fn = "reference", REFERENCES[op]
    if (op, label) not in _logged:
        _logged.add((op, label))
        log.info("ham::%s on %s: %s", op, device, label)
    return label, fn


def _kernel(op: str, device: str) -> Callable:
    def run(*args):
        outputs = select_kernel(op, device, *args)[1](*args)
        # Contiguous, as the fake kernel promises: a compiler (Inductor) reads the outputs with the fake's strides.
        return tuple(x.contiguous() for x in outputs) if isinstance(outputs, tuple) else outputs.contiguous()
    return run


def _check(condition: Any, message: Callable[[], str]) -> None:
    torch._check(condition, message)


def _fake(op: str) -> Callable:
    spec, in_place = FORMS[op]
    n = len(spec.inputs)
    names = spec.inplace.returns if in_place else tuple(a.name for a in spec.outputs)

    def fake(*args):
        tensors, attributes = args[:n], dict(zip((a.name for a in spec.attributes), args[n:], strict=True))
        dims = spec.check(tensors, attributes, values=False, require=_check)
        float_dtype = next(t.dtype for a, t in zip(spec.inputs, tensors, strict=True) if a.dtype == "T")
        outputs = []
        for name in names:
            arg = spec.arg(name)
            dtype = float_dtype if arg.dtype == "T" else getattr(torch, arg.dtype)
            outputs.append(tensors[0].new_empty([dims[letter] for letter in arg.shape], dtype=dtype))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return fake


for _op in FORMS:
    _lib.impl(_op, _kernel(_op, "cpu"), "CPU")
    _lib.impl(_op, _kernel(_op, "cuda"), "CUDA")
    torch.library.register_fake(f"{specs.TORCH_NAMESPACE}::{_op}", _fake(_op), lib=_lib)

cache_attention = torch.ops.ham.cache_attention
cache_append = torch.ops.ham.cache_append
cache_append_ = torch.ops.ham.cache_append_
gdn_prefill = torch.ops.ham.gdn_prefill
