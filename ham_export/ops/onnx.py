"""ONNX translations of the HAM custom ops, in three forms, for ``torch.onnx.export(..., dynamo=True)``.

``form="custom"`` emits one node per op in the ``ham.ai`` domain (version 1), with the spec's attributes; it runs
where the HAM op library is loaded (ONNX Runtime custom ops, TensorRT plugins). ``form="standard"`` emits only
default-domain ops of opset 27, the ops ONNX standardized for Gated DeltaNet hybrids (``LinearAttention``,
``Attention``, ``TensorScatter``), so the graph runs in a stock ONNX Runtime >= 1.32 with no op library.
``form="portable"`` emits only opset-18 ops (``Scan``, ``Loop``, ``GatherND``, ...) for runtimes without those.
Every form follows :mod:`ham_export.ops.spec` and computes what :mod:`ham_export.ops.reference` computes, with the
reference's argument order and names.

Usage (the exporter's flow; :func:`export_ops_model` and the ONNX Runtime backend do this)::

    register_schemas()
    onnx_program = torch.onnx.export(program, args, dynamo=True, dynamic_shapes=...,
                                     opset_version=OPSETS[form], custom_translation_table=translation_table(form))
    finish(onnx_program.model, form)   # the opset import the form's nodes need, before saving

Standard form (opset 27), in short:

* GdnPrefill: one ``LinearAttention`` (``update_rule="gated_delta"``, scale 1) over the T tokens with two query
  heads per state head (the op's grouped-query form): q_t, whose output over sqrt(K) is o_t, and the next token's
  key k_{t+1}, whose output k_{t+1}^T S_t is the state before token t+1's write, read where no other output gives
  it. Times exp(g_{t+1}) it is the router's prediction vhat_{t+1}; vhat_0 is k_0^T S_0 from the initial state (one
  MatMul). Exact; the cost is a second query head per state. ONNX Runtime 1.32 has no CPU kernel for this op (its
  ``com.microsoft`` LinearAttention is another op) and runs the op's ONNX function, a Scan over the tokens.
* CacheAttention, one new token (decode, T = 1 static): the cache is read where it lies, with no copy: logits
  MatMul(k_cache, q^T) [B, H, C, 1], the new token's logit apart, a ``Softmax`` over the C + 1 logits with the
  masked ones at -inf (a row with no key gives NaN there, replaced by 0), then MatMul(weights, v_cache) plus the new
  token's share. Entries past ``length`` get weight exactly 0 but are multiplied, so they must be finite (every
  runner allocates zeros and no form writes a non-finite value there); a NaN there would reach the output. float16
  inputs are cast to float32 (a copy of the cache). An ``Attention`` node would need the new token concatenated to
  the cache (a copy of the cache every step) and cannot attend a routed token the cache had no room for, so decode
  does not use it.
* CacheAttention, a prompt (T dynamic or > 1): ``Attention`` with a boolean mask over [cache zeroed past length |
  new tokens], the queries pre-scaled per head (scale 1); a row with no key gives 0, as in the reference.
* CacheAppend, one new token under ``drop``: ``TensorScatter`` of one row at ``min(length, C - 1)``, the new entry
  where it is stored, else the row already there (a write of what is there: exact, and nothing moves), so that
  ONNX Runtime updates a cache bound as both input and output in place. Every write lands at or past the old
  length or rewrites what is there, so the attention of the same step reads the same values whichever node runs
  first. Under ``evict`` and for a prompt, the portable form's append (a copy of the caches; a prompt's tokens are
  not one contiguous block, and eviction picks a slot by score).
* Everything else (the conv, projections, the decode GDN step) is the model's own standard ops. The model's conv
  state is [B, W-1, D] where ``CausalConvWithState`` takes [B, D, W-1], so the conv stays Concat + Conv.

Portable form (opset 18), in short:

* CacheAttention: keys = [cache | new], the cache part zeroed past ``length`` with ``Where`` (so NaN there cannot
  leak through the matmul), mask = (slot < length) for the cache and (routed[s] and s <= t) for new tokens. The
  softmax needs no fill constant (no -inf, nothing float16 cannot hold): masked logits are replaced by the row
  minimum (finite, at most every allowed logit), the row maximum is subtracted, and masked weights are set to
  exactly 0 after ``Exp``; a row with no key sums to 0 and gives 0, as in the reference.
* CacheAppend: slot = length + CumSum(routed) - 1; the tokens that fit are scattered into a slot -> token map (a
  dummy column takes the rest; O(B (T + C)), no [B, T, C] one-hot). Under ``evict`` the tokens that found the
  cache full then update that map one at a time (first lowest key, the score on the eviction grid; a strictly
  higher key wins), in an ONNX ``Loop`` whose trip count is the largest overflow of the batch (0 when nothing
  overflows), or unrolled when T is static and at most :data:`UNROLL_MAX_T`, so that decode graphs have no control
  flow. Keys, values and scores
  are then gathered once (``GatherND`` with ``batch_dims=2``) and put in place with ``Where``: copies, exact in
  any dtype.
* GdnPrefill: an ONNX ``Scan`` over the token axis (dynamic T) with the per-token delta rule of
  :func:`ham_export.ops.reference.gdn_step`.

Dtypes: float32 and float16. CacheAttention and GdnPrefill compute in float32 (float16 inputs are cast up and the
results cast down once), which keeps the recurrence accurate and runs on ONNX Runtime's CPU kernels; CacheAppend
moves data in the input dtype and compares scores in float32 (exact for float16).

Control flow and backends: the ``Scan`` of GdnPrefill and the ``Loop`` of an evict append with dynamic T are
standard ONNX; ONNX Runtime runs them (tested) and TensorRT's parser lists both as supported (not run here).
Apache TVM's Relax ONNX importer has no ``Loop`` or ``Scan`` converter and none for the opset-27 ops: for TVM,
import the ``torch.export`` programs instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable

import numpy as np
import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import FLOAT, ir
from onnxscript import opset18 as op

from . import spec as opspec
from .library import cache_append, cache_attention, gdn_prefill

FORMS = ("custom", "standard", "portable")
OPSETS = {"custom": 20, "standard": 27, "portable": 18}
"""The default-domain opset each form's graph imports (custom: torch's default; its standard nodes need 18)."""
FLOAT_TYPES = ("tensor(float)", "tensor(float16)")
UNROLL_MAX_T = 16
"""An evict append whose T is static and at most this is unrolled (no Loop); above it, or with a dynamic T, it
runs in a Loop."""

_LOOP = onnxscript.values.Op(op, "Loop", onnx.defs.get_schema("Loop", 18))
_TYPE_STRINGS = {"T": "T", "int64": "tensor(int64)", "bool": "tensor(bool)"}


# --------------------------------------------------------------------------------------------------- schemas


def onnx_schema(spec: opspec.OpSpec) -> OpSchema:
    """The ONNX ``OpSchema`` of an op, made from its spec: domain ``ham.ai``, inputs and outputs in spec order with
    the float type constraint ``T`` (float32 or float16), int64 and bool; every attribute required."""

    def param(arg: opspec.Arg) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(arg.name, _TYPE_STRINGS[arg.dtype], arg.doc)

    def attribute(attr: opspec.Attr) -> OpSchema.Attribute:
        doc = attr.doc + (f" One of: {', '.join(attr.choices)}." if attr.choices else "")
        return OpSchema.Attribute(attr.name, OpSchema.AttrType.STRING, doc, required=True)

    return OpSchema(
        spec.name, opspec.ONNX_DOMAIN, spec.version, spec.doc,
        inputs=[param(a) for a in spec.inputs],
        outputs=[param(a) for a in spec.outputs],
        type_constraints=[("T", list(FLOAT_TYPES), "float32 or float16, one per node")],
        attributes=[attribute(a) for a in spec.attributes],
    )


def register_schemas() -> None:
    """Register the ``OpSchema`` of every op in :data:`opspec.OPS` with ``onnx.defs`` (needed before exporting the
    custom form). Idempotent: an op already registered at its version is left as it is."""
    for spec in opspec.OPS:
        if not onnx.defs.has(spec.name, spec.version, opspec.ONNX_DOMAIN):
            onnx.defs.register_schema(onnx_schema(spec))


# ----------------------------------------------------------------------------------------------- custom form

_ham = onnxscript.values.Opset(opspec.ONNX_DOMAIN, opspec.ONNX_DOMAIN_VERSION)


def _check_policy(policy: str) -> None:
    opspec.CACHE_APPEND.check_attributes({"policy": policy}, prefix=opspec.CACHE_APPEND.name)


def cache_attention_custom(q, k_cache, v_cache, length, k, v, routed, scale):
    """``ham.ai::CacheAttention``."""
    return _ham.CacheAttention(q, k_cache, v_cache, length, k, v, routed, scale)


def cache_append_custom(k_cache, v_cache, score_cache, length, k, v, score, routed, policy):
    """``ham.ai::CacheAppend`` with its required ``policy`` attribute."""
    _check_policy(policy)
    return _ham.CacheAppend(k_cache, v_cache, score_cache, length, k, v, score, routed, policy=policy)


def gdn_prefill_custom(q, k, v, g, beta, state):
    """``ham.ai::GdnPrefill``."""
    return _ham.GdnPrefill(q, k, v, g, beta, state)


# ------------------------------------------------------------------------------------------------- helpers


def _to_float32(*xs):
    """Cast float16 values up to float32 (float32 values pass through)."""
    return tuple(x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT) for x in xs)


def _like(x, dtype: ir.DataType | None):
    """Cast ``x`` back to ``dtype`` if it differs (float32 results of a float16 op)."""
    return x if dtype in (None, ir.DataType.FLOAT) else op.Cast(x, to=dtype)


def _dim(x, axis: int):
    """The size of one axis of ``x`` as an int64 tensor of shape [1]."""
    return op.Shape(x, start=axis, end=axis + 1)


def _static_dim(x, axis: int) -> int | None:
    """The size of an axis when the exporter knows it as a number (not a symbol), else None."""
    size = x.shape[axis] if x.shape is not None else None
    return size if isinstance(size, int) else None


def _const(value, dtype) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


# ------------------------------------------------------------------------------------ portable CacheAttention


def cache_attention_portable(q, k_cache, v_cache, length, k, v, routed, scale):
    """CacheAttention in opset-18 ops (the portable form; see the module docstring)."""
    out_dtype = q.dtype
    q, k_cache, v_cache, k, v, scale = _to_float32(q, k_cache, v_cache, k, v, scale)
    k_all, v_all, mask = _prompt_keys(q, k_cache, v_cache, length, k, v, routed)
    logits = op.Mul(op.Unsqueeze(scale, [0, 2, 3]), op.MatMul(q, op.Transpose(k_all, perm=[0, 1, 3, 2])))
    weights, total = _masked_weights(logits, mask)
    out = op.Div(op.MatMul(weights, v_all), total)
    return _like(_refuse_bad_rows(out, length, _dim(k_cache, 2)), out_dtype)


def _prompt_keys(q, k_cache, v_cache, length, k, v, routed):
    """Keys and values [B, H, C + T, D] = [cache zeroed past length | new tokens], and the mask [B, 1, T, C + T]:
    (slot < length) for the cache, (routed[s] and s <= t) for the new tokens. Zeroing keeps a NaN past the length
    out of the matmuls."""
    zero = _const(0.0, np.float32)
    slots = op.Range(0, op.Squeeze(_dim(k_cache, 2)), 1)  # [C]
    positions = op.Range(0, op.Squeeze(_dim(q, 2)), 1)  # [T]
    old = op.Less(op.Unsqueeze(slots, [0]), op.Unsqueeze(length, [1]))  # [B, C]
    old4 = op.Unsqueeze(old, [1, 3])  # [B, 1, C, 1]
    k_all = op.Concat(op.Where(old4, k_cache, zero), k, axis=2)  # [B, H, C + T, K]
    v_all = op.Concat(op.Where(old4, v_cache, zero), v, axis=2)
    causal = op.LessOrEqual(op.Unsqueeze(positions, [0]), op.Unsqueeze(positions, [1]))  # [t, s]: s <= t
    new = op.And(op.Unsqueeze(causal, [0]), op.Unsqueeze(routed, [1]))  # [B, T, T]
    old_rows = op.Expand(op.Unsqueeze(old, [1]), op.Concat(_dim(q, 0), _dim(q, 2), _dim(k_cache, 2), axis=0))
    mask = op.Unsqueeze(op.Concat(old_rows, new, axis=2), [1])  # [B, 1, T, C + T]
    return k_all, v_all, mask


def _masked_weights(logits, mask):
    """The softmax weights of ``logits`` where ``mask``, unnormalized, and their row sums (1 for a row with no key,
    whose weights are all 0). No fill constant: masked logits take the row minimum (finite, at most every allowed
    logit), the row maximum is subtracted, and masked weights are set to exactly 0 after ``Exp``."""
    zero = _const(0.0, np.float32)
    floor = op.ReduceMin(logits, [-1], keepdims=1)
    filled = op.Where(mask, logits, floor)
    top = op.ReduceMax(filled, [-1], keepdims=1)
    weights = op.Where(mask, op.Exp(op.Sub(filled, top)), zero)
    total = op.ReduceSum(weights, [-1], keepdims=1)
    return weights, op.Where(op.Greater(total, zero), total, _const(1.0, np.float32))


def _refuse_bad_rows(out, length, capacity):
    """A row whose length lies outside [0, C] is refused (spec.DEVICE_REFUSAL): NaN, never a clamped read."""
    valid = _valid_length(length, capacity)
    return op.Where(op.Unsqueeze(valid, [1, 2, 3]), out, _const(float("nan"), np.float32))


def _valid_length(length, capacity):
    """[B] bool: 0 <= length <= C (``capacity`` an int64 [1])."""
    return op.And(op.GreaterOrEqual(length, _const(0, np.int64)), op.LessOrEqual(length, capacity))


# --------------------------------------------------------------------------------------- portable CacheAppend


class _BodyOps:
    """Stands in for ``op`` while a Loop body is built: ``ops.Name(*inputs, **attributes)`` records a standard
    node into :attr:`nodes` (Python ints and int lists become int64 constants), so that one step function serves
    both the Loop body and the unrolled form. Outer-scope values may be used as inputs."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self._prefix = f"ham_body{next(self._ids)}_"
        self._count = itertools.count()

    def _name(self) -> str:
        return f"{self._prefix}{next(self._count)}"

    def input(self, dtype: ir.DataType, rank: int) -> ir.Value:
        """A new body input of this dtype and rank (dims unknown)."""
        return ir.Value(name=self._name(), type=ir.TensorType(dtype), shape=ir.Shape([None] * rank))

    def _value(self, x) -> ir.Value:
        if isinstance(x, ir.Value):
            return x
        if isinstance(x, int) or (isinstance(x, list) and all(isinstance(i, int) for i in x)):
            return self.Constant(value=ir.tensor(np.asarray(x, dtype=np.int64)))
        raise TypeError(f"a Loop body takes values, ints or int lists as inputs, got {x!r}")

    def __getattr__(self, op_type: str) -> Callable[..., ir.Value]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def record(*inputs, **attributes) -> ir.Value:
            node = ir.Node("", op_type, [self._value(x) for x in inputs],
                           attributes=ir.convenience.convert_attributes(attributes), name=self._name())
            node.outputs[0].name = self._name()
            self.nodes.append(node)
            return node.outputs[0]
        return record


def _evict_key(score32):
    """The eviction key of float32 scores: floor(score * EVICT_GRID + 0.5) (spec.EVICT_GRID)."""
    return op.Floor(op.Add(op.Mul(score32, _const(float(opspec.EVICT_GRID), np.float32)), _const(0.5, np.float32)))


def _evict_step(ops, i, src, *, routed, spill, overflow, score, score_cache, slots):
    """One token of the evict phase, for every batch row at once: the ``i``-th routed token that found the cache
    full (where the row has one) replaces the first entry of lowest key if its key is strictly higher (``score``
    and ``score_cache`` hold the keys, :func:`_evict_key`).

    ``ops`` is ``op`` (unrolled) or a :class:`_BodyOps` (Loop body). ``src`` [B, C] int64 maps each slot to the
    new token that it holds now, -1 where it keeps its cached entry; ``spill`` [B, T] is slot - C, the rank of a
    routed token among those that found the cache full when it is >= 0; ``overflow`` [B]; ``score`` [B, T] and
    ``score_cache`` [B, C] float32; ``slots`` [1, C] = 0..C-1. Returns the updated ``src``."""
    hit = ops.And(routed, ops.Equal(spill, i))  # [B, T]: the i-th spilled token, at most one per row
    token = ops.ArgMax(ops.Cast(hit, to=ir.DataType.FLOAT), axis=1, keepdims=1)  # [B, 1]
    active = ops.Less(i, ops.Unsqueeze(overflow, [1]))  # [B, 1]: the row has an i-th spilled token
    current = ops.Where(ops.GreaterOrEqual(src, 0), ops.GatherElements(score, ops.Max(src, 0), axis=1),
                        score_cache)  # [B, C] the scores in the cache as it stands
    lowest = ops.ArgMin(current, axis=1, keepdims=1)  # [B, 1]: the first lowest (select_last_index = 0)
    beats = ops.Greater(ops.GatherElements(score, token, axis=1), ops.GatherElements(current, lowest, axis=1))
    replace = ops.And(ops.Equal(slots, lowest), ops.And(active, beats))  # [B, C], at most one per row
    return ops.Where(replace, token, src)


def _evict_loop(first_src, trips, step_inputs: dict):
    """The evict phase as an ONNX Loop of ``trips`` iterations, carrying the slot -> token map."""
    body = _BodyOps()
    i, cond, src = body.input(ir.DataType.INT64, 0), body.input(ir.DataType.BOOL, 0), body.input(ir.DataType.INT64, 2)
    src_out = _evict_step(body, i, src, **step_inputs)
    graph = ir.Graph([i, cond, src], [body.Identity(cond), src_out], nodes=body.nodes, name="evict_step",
                     opset_imports={"": 18})
    # Called by keyword: torch 2.13's tracer mis-assigns positional inputs before a variadic one (Loop's v_initial).
    return _LOOP(M=trips, cond=_const(True, np.bool_), v_initial=(first_src,), body=graph)


def _gather_slots(new, cache, token, from_new):
    """[B, H, C, D]: per slot, the new token ``token[b, c]`` of ``new`` [B, H, T, D] where ``from_new`` [B, C], else
    the cached entry."""
    index = op.Expand(op.Unsqueeze(token, [1, 3]),
                      op.Concat(_dim(cache, 0), _dim(cache, 1), _dim(cache, 2), _const([1], np.int64), axis=0))
    gathered = op.GatherND(new, index, batch_dims=2)  # [B, H, C, D]
    return op.Where(op.Unsqueeze(from_new, [1, 3]), gathered, cache)


def cache_append_portable(k_cache, v_cache, score_cache, length, k, v, score, routed, policy):
    """CacheAppend in opset-18 ops (the portable form; see the module docstring)."""
    _check_policy(policy)
    capacity = _dim(k_cache, 2)  # [1]
    # A row whose length lies outside [0, C] is refused (spec.DEVICE_REFUSAL): nothing written, length kept,
    # overflow -1.
    valid = _valid_length(length, capacity)  # [B]
    count = op.Cast(op.And(routed, op.Unsqueeze(valid, [1])), to=ir.DataType.INT64)
    wanted = op.Add(length, op.ReduceSum(count, [1], keepdims=0))
    overflow = op.Where(valid, op.Max(op.Sub(wanted, capacity), _const(0, np.int64)),
                        _const(opspec.INVALID_LENGTH, np.int64))
    new_length = op.Where(valid, op.Min(wanted, capacity), length)

    slot = op.Sub(op.Add(op.Unsqueeze(length, [1]), op.CumSum(count, _const(1, np.int64))), 1)  # [B, T]
    fits = op.And(op.And(routed, op.Unsqueeze(valid, [1])), op.Less(slot, capacity))
    tokens = _dim(k, 2)
    positions = op.Expand(op.Unsqueeze(op.Range(0, op.Squeeze(tokens), 1), [0]), op.Shape(routed))  # [B, T]
    # The slot -> token map of the tokens that fit (-1: keeps its entry); the others all go to a dummy column C,
    # dropped after. reduction="max" keeps the scatter defined there (a real slot receives at most one token).
    unset = op.Expand(_const([-1], np.int64), op.Concat(_dim(k, 0), op.Add(capacity, 1), axis=0))
    src = op.ScatterElements(unset, op.Where(fits, slot, capacity), positions, axis=1, reduction="max")
    src = op.Slice(src, _const([0], np.int64), capacity, _const([1], np.int64))  # [B, C]

    if policy == "evict":
        score32, score_cache32 = _to_float32(score, score_cache)
        slots = op.Unsqueeze(op.Range(0, op.Squeeze(capacity), 1), [0])  # [1, C]
        step_inputs = dict(routed=routed, spill=op.Sub(slot, capacity), overflow=overflow, score=_evict_key(score32),
                           score_cache=_evict_key(score_cache32), slots=slots)
        static_t = _static_dim(k, 2)
        if static_t is not None and static_t <= UNROLL_MAX_T:
            for i in range(static_t):
                src = _evict_step(op, _const(i, np.int64), src, **step_inputs)
        else:
            trips = op.Max(op.ReduceMax(overflow, keepdims=0), _const(0, np.int64))  # -1: refused rows only
            src = _evict_loop(src, trips, step_inputs)

    from_new = op.GreaterOrEqual(src, 0)
    token = op.Max(src, _const(0, np.int64))
    k_out = _gather_slots(k, k_cache, token, from_new)
    v_out = _gather_slots(v, v_cache, token, from_new)
    s_out = op.Where(from_new, op.GatherElements(score, token, axis=1), score_cache)
    return k_out, v_out, s_out, new_length, overflow


# ---------------------------------------------------------------------------------------- portable GdnPrefill


@onnxscript.script(default_opset=op)
def _gdn_scan(q: FLOAT, k: FLOAT, v: FLOAT, g: FLOAT, beta: FLOAT, state: FLOAT, inv_sqrt_k: FLOAT
              ) -> tuple[FLOAT, FLOAT, FLOAT]:
    @onnxscript.graph()
    def delta_rule(s_in: FLOAT[...], q_t: FLOAT[...], k_t: FLOAT[...], v_t: FLOAT[...], g_t: FLOAT[...],
                   beta_t: FLOAT[...]):
        # One token of reference.gdn_step, over [B, H]: q_t, k_t [B, H, K], v_t [B, H, V], g_t, beta_t [B, H].
        alpha = op.Unsqueeze(op.Exp(g_t), [2, 3])  # [B, H, 1, 1]
        vhat = op.Mul(alpha, op.MatMul(op.Unsqueeze(k_t, [2]), s_in))  # [B, H, 1, V]
        write = op.Mul(op.Mul(op.Unsqueeze(beta_t, [2, 3]), op.Unsqueeze(k_t, [3])),
                       op.Sub(op.Unsqueeze(v_t, [2]), vhat))  # [B, H, K, V]
        s_out = op.Add(op.Mul(alpha, s_in), write)
        o = op.Mul(op.MatMul(op.Unsqueeze(q_t, [2]), s_out), inv_sqrt_k)
        return s_out, op.Squeeze(o, [2]), op.Squeeze(vhat, [2])

    state_out, o, vhat = op.Scan(state, q, k, v, g, beta, body=delta_rule, num_scan_inputs=5,
                                 scan_input_axes=[1, 1, 1, 1, 1], scan_output_axes=[1, 1])
    return o, vhat, state_out


def gdn_prefill_portable(q, k, v, g, beta, state):
    """GdnPrefill in opset-18 ops: a Scan over T of the per-token delta rule (the portable form)."""
    out_dtype = q.dtype
    q, k, v, g, beta, state = _to_float32(q, k, v, g, beta, state)
    width = _static_dim(q, 3)
    if width is not None:
        inv_sqrt_k = _const(1.0 / math.sqrt(width), np.float32)
    else:
        inv_sqrt_k = op.Reciprocal(op.Sqrt(op.Cast(op.Squeeze(_dim(q, 3)), to=ir.DataType.FLOAT)))
    o, vhat, state_out = _gdn_scan(q, k, v, g, beta, state, inv_sqrt_k)
    return _like(o, out_dtype), _like(vhat, out_dtype), _like(state_out, out_dtype)


# ---------------------------------------------------------------------------------------------- standard form

_OPSET27 = onnxscript.values.Opset("", 27)
_INT64_MAX = np.iinfo(np.int64).max


def _op27(name: str, outputs: int | None = None) -> onnxscript.values.Op:
    """An opset-27 op for the translations; ``outputs``: keep only its first outputs (torch's exporter gives a node
    every output of its schema, and a runtime may compute an optional output that is there, unread)."""
    schema = onnx.defs.get_schema(name, 27)
    if outputs is not None:
        schema = OpSchema(schema.name, schema.domain, schema.since_version, schema.doc, inputs=list(schema.inputs),
                          outputs=list(schema.outputs[:outputs]),
                          type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description)
                                            for c in schema.type_constraints],
                          attributes=list(schema.attributes.values()))
    return onnxscript.values.Op(_OPSET27, name, schema)


_LINEAR_ATTENTION, _TENSOR_SCATTER = _op27("LinearAttention"), _op27("TensorScatter")
_ATTENTION = _op27("Attention", outputs=1)  # Y alone: no present_key / present_value copies


def cache_attention_standard(q, k_cache, v_cache, length, k, v, routed, scale):
    """CacheAttention in opset-27 ops: the cache read in place for one new token, ``Attention`` for a prompt (see
    the module docstring)."""
    out_dtype, one_token = q.dtype, _static_dim(q, 2) == 1  # before a cast loses the shape
    q, k_cache, v_cache, k, v, scale = _to_float32(q, k_cache, v_cache, k, v, scale)
    capacity = _dim(k_cache, 2)
    q = op.Mul(q, op.Unsqueeze(scale, [0, 2, 3]))  # per-head scale first: the logits need no further scaling
    if one_token:
        cached = op.Reshape(op.MatMul(k_cache, op.Reshape(q, _const([0, 0, -1, 1], np.int64))),
                            _const([0, 0, 1, -1], np.int64))  # [B, H, 1, C]: k_cache is read, not copied
        new = op.ReduceSum(op.Mul(q, k), [-1], keepdims=1)  # [B, H, 1, 1]
        old = op.Less(op.Unsqueeze(op.Range(0, op.Squeeze(capacity), 1), [0]), op.Unsqueeze(length, [1]))  # [B, C]
        mask = op.Unsqueeze(op.Concat(old, routed, axis=1), [1, 2])  # [B, 1, 1, C + 1]
        logits = op.Where(mask, op.Concat(cached, new, axis=3), _const(-np.inf, np.float32))
        weights = op.Softmax(logits, axis=-1)
        three = _const([3], np.int64)
        w_cached = op.Slice(weights, _const([0], np.int64), capacity, three)
        w_new = op.Slice(weights, capacity, _const([_INT64_MAX], np.int64), three)
        out = op.Add(op.MatMul(w_cached, v_cache), op.Mul(w_new, v))
        # A row with no key (nothing cached, the token not routed) has a softmax of NaN: 0, as in the reference.
        seen = op.Or(op.Greater(length, _const(0, np.int64)), op.Squeeze(routed, [1]))  # [B]
        out = op.Where(op.Unsqueeze(seen, [1, 2, 3]), out, _const(0.0, np.float32))
    else:
        k_all, v_all, mask = _prompt_keys(q, k_cache, v_cache, length, k, v, routed)
        out = _ATTENTION(q, k_all, v_all, mask, scale=1.0)
        # A query with no key: 0, as in the reference (whatever the runtime's softmax gives for an empty row).
        seen = op.ReduceMax(op.Cast(mask, to=ir.DataType.FLOAT), [-1], keepdims=1)  # [B, 1, T, 1]
        out = op.Where(op.Greater(seen, _const(0.0, np.float32)), out, _const(0.0, np.float32))
    return _like(_refuse_bad_rows(out, length, capacity), out_dtype)


def cache_append_standard(k_cache, v_cache, score_cache, length, k, v, score, routed, policy):
    """CacheAppend in opset-27 ops: one new token under ``drop`` is one ``TensorScatter`` row per cache; ``evict``
    and prompts take the portable form (see the module docstring)."""
    _check_policy(policy)
    if policy != "drop" or _static_dim(k, 2) != 1:
        return cache_append_portable(k_cache, v_cache, score_cache, length, k, v, score, routed, policy)
    capacity = _dim(k_cache, 2)  # [1]
    valid = _valid_length(length, capacity)  # [B]
    room = op.And(op.GreaterOrEqual(length, _const(0, np.int64)), op.Less(length, capacity))  # 0 <= length < C
    wants = op.Squeeze(routed, [1])
    stored = op.And(wants, room)
    # Full or refused rows rewrite their last entry with what it holds; the others write at their length.
    index = op.Where(room, length, op.Sub(capacity, _const(1, np.int64)))  # [B], in [0, C)

    def put(cache, new):
        """Write row ``index[b]`` of ``cache`` (its axis 2, or 1 for the scores): ``new`` where stored, else the
        row already there."""
        axis = 2 if len(cache.shape) == 4 else 1
        axes = [1, 2, 3] if axis == 2 else [1]
        at = op.Expand(op.Unsqueeze(index, axes), op.Shape(new))
        update = op.Where(op.Unsqueeze(stored, axes), new, op.GatherElements(cache, at, axis=axis))
        return _TENSOR_SCATTER(cache, update, index, axis=axis)

    overflow = op.Where(valid, op.Cast(op.And(wants, op.Not(room)), to=ir.DataType.INT64),
                        _const(opspec.INVALID_LENGTH, np.int64))
    new_length = op.Add(length, op.Cast(stored, to=ir.DataType.INT64))
    return put(k_cache, k), put(v_cache, v), put(score_cache, score), new_length, overflow


def gdn_prefill_standard(q, k, v, g, beta, state):
    """GdnPrefill as one ``LinearAttention`` over the T tokens, two query heads per state: q_t, and the next token's
    key, which reads the state before that token's write (see the module docstring)."""
    out_dtype = q.dtype
    heads, width, value_width = _static_dim(q, 2), _static_dim(q, 3), _static_dim(v, 3)  # before a cast loses them
    q, k, v, g, beta, state = _to_float32(q, k, v, g, beta, state)
    if None in (heads, width, value_width):
        raise ValueError("the opset-27 GdnPrefill needs static H, K and V (LinearAttention packs the heads)")
    one = _const([1], np.int64)
    # k_{t+1} at step t (zeros at the last step, whose read no token needs): [B, T, H, K]
    following = op.Concat(op.Slice(k, one, _const([_INT64_MAX], np.int64), one),
                          op.Expand(_const(0.0, np.float32), op.Concat(_dim(k, 0), one, _dim(k, 2), _dim(k, 3),
                                                                       axis=0)), axis=1)
    queries = op.Reshape(op.Concat(op.Unsqueeze(q, [3]), op.Unsqueeze(following, [3]), axis=3),
                         _const([0, 0, 2 * heads * width], np.int64))  # query heads (q, next k) per state head

    def packed(x, size: int):
        return op.Reshape(x, _const([0, 0, size], np.int64))

    out, state_out = _LINEAR_ATTENTION(
        queries, packed(k, heads * width), packed(v, heads * value_width), state, g, beta,
        q_num_heads=2 * heads, kv_num_heads=heads, scale=1.0, update_rule="gated_delta")
    o, ahead = op.Split(op.Reshape(out, _const([0, 0, heads, 2, value_width], np.int64)), num_outputs=2, axis=3)
    first = op.MatMul(op.Unsqueeze(op.Gather(k, _const(0, np.int64), axis=1), [2]), state)  # [B, H, 1, V]: k_0^T S
    reads = op.Concat(op.Transpose(first, perm=[0, 2, 1, 3]),
                      op.Slice(op.Squeeze(ahead, [3]), _const([0], np.int64), _const([-1], np.int64), one), axis=1)
    vhat = op.Mul(op.Unsqueeze(op.Exp(g), [3]), reads)  # alpha_t k_t^T S_{t-1}
    o = op.Mul(op.Squeeze(o, [3]), _const(1.0 / math.sqrt(width), np.float32))
    return _like(o, out_dtype), _like(vhat, out_dtype), _like(state_out, out_dtype)


# ------------------------------------------------------------------------------------------------------- table

_TRANSLATIONS = {
    "custom": (cache_attention_custom, cache_append_custom, gdn_prefill_custom),
    "standard": (cache_attention_standard, cache_append_standard, gdn_prefill_standard),
    "portable": (cache_attention_portable, cache_append_portable, gdn_prefill_portable),
}


def translation_table(form: str) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: ``torch.ops.ham.<op>.default`` -> translation.

    ``form`` is ``"custom"`` (``ham.ai`` nodes; their schemas are registered here, see :func:`register_schemas`),
    ``"standard"`` (opset-27 ops only) or ``"portable"`` (opset-18 ops only). Translations are called with the op's
    arguments in spec order, the attribute (``policy``) included as a positional str, as ``torch.onnx`` does."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "custom":
        register_schemas()
    attention, append, prefill = _TRANSLATIONS[form]
    return {cache_attention.default: attention, cache_append.default: append, gdn_prefill.default: prefill}


def export_options(form: str) -> dict:
    """The keyword arguments of ``torch.onnx.export`` for a form: its translation table and opset."""
    return {"custom_translation_table": translation_table(form), "opset_version": OPSETS[form]}


def finish(model: onnx.ModelProto | ir.Model, form: str) -> onnx.ModelProto | ir.Model:
    """Import the default-domain opset the form's nodes need (in place; returns ``model``, an ``onnx.ModelProto`` or
    the exporter's ``ir.Model``). torch's exporter writes its own ops at opset 18 and keeps that import when asked
    for a later opset; the opset-27 nodes of the standard form need 27, under which every node here keeps its
    meaning (``onnx.checker`` checks each node against it)."""
    if isinstance(model, ir.Model):
        if model.opset_imports.get("", 0) < OPSETS[form]:
            model.opset_imports[""] = OPSETS[form]
        return model
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < OPSETS[form]:
            entry.version = OPSETS[form]
    return model


def export_ops_model(module: torch.nn.Module | torch.export.ExportedProgram, args: tuple, form: str,
                     dynamic_shapes=None, path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Export ``module`` (or an ``ExportedProgram``) calling HAM ops to ONNX in the given form, check it with
    ``onnx.checker.check_model(full_check=True)``, save it to ``path`` if given, and return it."""
    register_schemas()
    converter_log = logging.getLogger("onnxscript")  # its failed opset conversion, which finish() settles
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
                                    **export_options(form))
    finally:
        converter_log.setLevel(level)
    model = finish(program.model_proto, form)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model
