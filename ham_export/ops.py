"""The HAM custom ops, ``torch.ops.ham.*``, defined from :mod:`ham_export.opspec`.

Each op is a real ``torch.library`` op: its schema comes from its spec, its kernel on every device is the
plain-PyTorch reference of :mod:`ham_export.reference` (fast kernels register for their own device on top), and
its fake kernel checks shapes and dtypes with ``torch._check`` so that a wrong shape fails at export time, not in
an engine. The ops are functional: they return new state, never mutate their inputs, which is what
``torch.export`` and the ONNX exporter need.

Importing this module registers the ops once.
"""

from __future__ import annotations

import torch

from . import opspec
from . import reference as ref

_lib = torch.library.Library(opspec.TORCH_NAMESPACE, "DEF")
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
    return ref.gdn_chunked(q, k, v, g, beta, state)


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
