"""The HAM custom ops, ``torch.ops.ham.*``, defined from :mod:`ham_export.opspec`.

Each op is a real ``torch.library`` op: its schema comes from its spec, its kernel on every device is the
plain-PyTorch reference of :mod:`ham_export.reference` (fast kernels register for their own device on top), and
its fake kernel checks shapes and dtypes with ``torch._check`` so that a wrong shape fails at export time, not in
an engine. The ops are functional: they return new state, never mutate their inputs, which is what
``torch.export`` and the ONNX exporter need.

On CUDA tensors each op runs a Triton kernel of ``kernels/`` (:data:`TRITON_KERNELS`); the choice is logged once
per op, a missing Triton is an error (never a silent switch), and ``HAM_FORCE_REFERENCE=1`` runs the reference.

Importing this module registers the ops once.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable

import torch

from . import opspec
from . import reference as ref
from .errors import HamError

log = logging.getLogger(__name__)
FORCE_REFERENCE = "HAM_FORCE_REFERENCE"

try:
    _lib = torch.library.Library(opspec.TORCH_NAMESPACE, "DEF")
except RuntimeError:  # the namespace exists: most likely libham_torch_ops.so was loaded into this process first
    raise HamError("the ham ops are already registered in this process (was runtimes/libtorch's "
                   "libham_torch_ops.so loaded?); ham_export.ops registers them for Python, the C++ library is for "
                   "C++ processes: load one or the other") from None
for _spec in opspec.OPS:
    _lib.define(f"{_spec.torch_name}{_spec.torch_schema()}")


def _impl(spec: opspec.OpSpec):
    def register(fn):
        _lib.impl(spec.torch_name, fn, "CompositeExplicitAutograd")
        return fn
    return register


def _fake(spec: opspec.OpSpec):
    return torch.library.register_fake(f"{opspec.TORCH_NAMESPACE}::{spec.torch_name}", lib=_lib)


@_impl(opspec.CACHE_ATTENTION)
def _cache_attention(q, k_cache, v_cache, length, k, v, routed, scale):
    return ref.cache_attention(q, k_cache, v_cache, length, k, v, routed, scale)


@_impl(opspec.CACHE_APPEND)
def _cache_append(k_cache, v_cache, score_cache, length, k, v, score, routed, policy):
    return ref.cache_append(k_cache, v_cache, score_cache, length, k, v, score, routed, policy)


@_impl(opspec.GDN_PREFILL)
def _gdn_prefill(q, k, v, g, beta, state):
    # Contiguous, as the fake kernel promises: a compiler (Inductor) reads the outputs with the fake's strides.
    return tuple(x.contiguous() for x in ref.gdn_chunked(q, k, v, g, beta, state))


# op -> [(condition on the call, "module:function")]: the first matching entry is the CUDA kernel.
TRITON_KERNELS: dict[str, list[tuple[Callable[..., bool], str]]] = {
    "cache_attention": [(lambda q, *_: q.shape[2] == 1, "kernels.cache_attention:cache_attention_decode"),
                        (lambda *_: True, "kernels.prefill_attention:prefill_attention")],
    "cache_append": [(lambda *_: True, "kernels.cache_append:cache_append")],
    "gdn_prefill": [(lambda *_: True, "kernels.gdn:gdn_chunked")],
}
_REFERENCES = {"cache_attention": ref.cache_attention, "cache_append": ref.cache_append,
               "gdn_prefill": ref.gdn_chunked}
_logged: set[tuple[str, str]] = set()


class KernelUnavailableError(HamError):
    """A CUDA call of a ham op whose Triton kernel cannot be imported."""


def force_reference() -> bool:
    """Whether ``HAM_FORCE_REFERENCE`` asks for the plain-PyTorch reference on every device."""
    return os.environ.get(FORCE_REFERENCE, "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _load_kernel(op: str, target: str) -> Callable:
    """The function named by ``"module:function"``, imported once (this runs on every CUDA call of an op)."""
    module_name, fn_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KernelUnavailableError(
            f"ham::{op} on CUDA runs the Triton kernel {target}, which cannot be imported ({exc}); install "
            f"triton (pip install 'ham-export[triton]') or set {FORCE_REFERENCE}=1 for the plain-PyTorch "
            f"reference") from None
    return getattr(module, fn_name)


def select_cuda_kernel(op: str, *args) -> Callable:
    """The function that runs ``ham::<op>`` for these CUDA arguments: its Triton kernel, or the reference when
    ``HAM_FORCE_REFERENCE`` is set. Logs the choice the first time it is made for each (op, function)."""
    if force_reference():
        choice, fn = f"reference ({FORCE_REFERENCE} is set)", _REFERENCES[op]
    else:
        target = next(target for applies, target in TRITON_KERNELS[op] if applies(*args))
        choice, fn = f"Triton {target}", _load_kernel(op, target)
    if (op, choice) not in _logged:
        _logged.add((op, choice))
        log.info("ham::%s on CUDA: %s", op, choice)
    return fn


def _cuda(op: str) -> Callable:
    def run(*args):
        outputs = select_cuda_kernel(op, *args)(*args)
        return tuple(x.contiguous() for x in outputs) if isinstance(outputs, tuple) else outputs.contiguous()
    return run


for _name in TRITON_KERNELS:
    _lib.impl(_name, _cuda(_name), "CUDA")


def _check_shape(name: str, x: torch.Tensor, shape: tuple) -> None:
    torch._check(x.dim() == len(shape), lambda: f"{name} must have {len(shape)} dims, got {x.dim()}")
    for i, size in enumerate(shape):
        torch._check(x.shape[i] == size, lambda i=i, size=size: f"{name}.shape[{i}] is {x.shape[i]}, expected {size}")


def _check_dtype(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    torch._check(x.dtype == dtype, lambda: f"{name} must be {dtype}, got {x.dtype}")


@_fake(opspec.CACHE_ATTENTION)
def _cache_attention_fake(q, k_cache, v_cache, length, k, v, routed, scale):
    b, h, t, dk = q.shape
    c, dv = k_cache.shape[2], v_cache.shape[3]
    _check_shape("k_cache", k_cache, (b, h, c, dk))
    _check_shape("v_cache", v_cache, (b, h, c, dv))
    _check_shape("length", length, (b,))
    _check_shape("k", k, (b, h, t, dk))
    _check_shape("v", v, (b, h, t, dv))
    _check_shape("routed", routed, (b, t))
    _check_shape("scale", scale, (h,))
    _check_dtype("length", length, torch.int64)
    _check_dtype("routed", routed, torch.bool)
    return q.new_empty(b, h, t, dv)


@_fake(opspec.CACHE_APPEND)
def _cache_append_fake(k_cache, v_cache, score_cache, length, k, v, score, routed, policy):
    b, h, c, dk = k_cache.shape
    t, dv = k.shape[2], v_cache.shape[3]
    _check_shape("v_cache", v_cache, (b, h, c, dv))
    _check_shape("score_cache", score_cache, (b, c))
    _check_shape("length", length, (b,))
    _check_shape("k", k, (b, h, t, dk))
    _check_shape("v", v, (b, h, t, dv))
    _check_shape("score", score, (b, t))
    _check_shape("routed", routed, (b, t))
    _check_dtype("length", length, torch.int64)
    _check_dtype("routed", routed, torch.bool)
    torch._check(policy in ref.POLICIES, lambda: f"policy must be one of {ref.POLICIES}, got {policy!r}")
    return (torch.empty_like(k_cache), torch.empty_like(v_cache), torch.empty_like(score_cache),
            torch.empty_like(length), torch.empty_like(length))


@_fake(opspec.GDN_PREFILL)
def _gdn_prefill_fake(q, k, v, g, beta, state):
    b, t, h, dk = q.shape
    dv = v.shape[3]
    _check_shape("k", k, (b, t, h, dk))
    _check_shape("v", v, (b, t, h, dv))
    _check_shape("g", g, (b, t, h))
    _check_shape("beta", beta, (b, t, h))
    _check_shape("state", state, (b, h, dk, dv))
    return q.new_empty(b, t, h, dv), q.new_empty(b, t, h, dv), torch.empty_like(state)


cache_attention = torch.ops.ham.cache_attention
cache_append = torch.ops.ham.cache_append
gdn_prefill = torch.ops.ham.gdn_prefill
