"""One spec per HAM custom op: its names, version, inputs, outputs, attributes and preconditions, written once.

Everything else about an op is made from its spec, or checked against it by a test:

- the ``torch.library`` schemas of ``ham::<op>`` and of the in-place form, and the fake kernels
  (:mod:`ham_export.ops.library`);
- the ONNX ``OpSchema`` in domain ``ham.ai`` (:mod:`ham_export.ops.onnx`);
- the C++ header ``runtimes/common/ham_op_spec.h`` (:mod:`ham_export.ops.cpp`, checked in; a test fails when it is
  stale), from which the ONNX Runtime and libtorch libraries take their names, schemas and input checks;
- :meth:`OpSpec.check`, the one input check of every Python implementation (reference, torch op, Triton launchers).

Argument order is that of the reference function in :mod:`ham_export.ops.reference`.

Dtype kinds: ``T`` the op's float type (one per call; float32, float16 or bfloat16, each implementation says which it
has kernels for), ``int64``, ``bool``. Shape letters: B batch, H heads, T new tokens, C cache capacity, K key width,
V value width.

Preconditions, the same for every implementation:

1. every input has the rank of its letters, and each letter one size (bound where it is first seen);
2. every size is at least 1 (:data:`MIN_SIZE`);
3. the float inputs share one dtype; the others are int64 or bool as the spec says;
4. each :class:`Bound` holds: ``0 <= length <= C``;
5. each attribute is one of its choices.

A failure is an error raised before anything is read or written: never a clamp, never an out-of-bounds access.
An implementation whose bounded values live on a device it cannot read without a synchronisation (a GPU kernel, a
compiled graph) refuses in the kernel instead, as :attr:`OpSpec.refusal` says (for the cache ops: a refused batch
row writes nothing, reports ``overflow = -1`` and attends to nothing but NaN), and the runner that reads the
outputs turns that into an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError

TORCH_NAMESPACE = "ham"
ONNX_DOMAIN = "ham.ai"
ONNX_DOMAIN_VERSION = 1
MIN_SIZE = 1
INVALID_LENGTH = -1
"""The ``overflow`` a device kernel reports for a batch row whose ``length`` was outside [0, C] (nothing written)."""
EVICT_GRID = 1024
"""Eviction compares router scores on a grid of 1 / EVICT_GRID, by their key floor(float32(score) * EVICT_GRID +
0.5) (the score rounded to the grid; exact in float32, NaN stays NaN): scores a few ulps apart (one score computed
in a prefill and again in a decode step, or by two backends) have one key, and then the lowest slot decides. The
lines between keys lie halfway between grid points, away from the saturated scores 0, 1 and 2."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("T", "int64", "bool")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
               torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The name every implementation's messages use: ``float32``, ``int64``, ``bool``, ..."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Arg:
    """One input or output: its name, dtype kind, shape letters and meaning."""

    name: str
    dtype: str  # one of KINDS
    shape: str  # letters, e.g. "BHCK" for [B, H, C, K]
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in KINDS:
            raise ValueError(f"{self.name}: dtype kind must be one of {KINDS}, got {self.dtype!r}")

    @property
    def letters(self) -> str:
        return ", ".join(self.shape)


@dataclass(frozen=True)
class Attr:
    """A string attribute with a closed set of choices (every attribute is required)."""

    name: str
    choices: tuple[str, ...]
    doc: str = ""


@dataclass(frozen=True)
class Bound:
    """A precondition on the values of an int64 input: ``low <= x <= size of letter high``."""

    arg: str
    low: int
    high: str
    doc: str = ""


@dataclass(frozen=True)
class InPlace:
    """The in-place form of an op: ``ham::<name>`` writes ``writes`` (inputs) in place and returns ``returns``."""

    name: str
    writes: tuple[str, ...]
    returns: tuple[str, ...]
    doc: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str  # ONNX op type
    torch_name: str  # ham::<torch_name>, and the reference function's name
    version: int
    inputs: tuple[Arg, ...]
    outputs: tuple[Arg, ...]
    attributes: tuple[Attr, ...] = ()
    bounds: tuple[Bound, ...] = ()
    inplace: InPlace | None = None
    doc: str = ""
    refusal: str = ""  # what a device kernel does on a bound it cannot check on the host
    input_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", tuple(a.name for a in self.inputs))
        names = {a.name for a in self.inputs}
        for bound in self.bounds:
            if bound.arg not in names:
                raise ValueError(f"{self.name}: bound on unknown input {bound.arg!r}")
        if self.inplace is not None:
            outputs = {a.name for a in self.outputs}
            unknown = set(self.inplace.writes) - names | set(self.inplace.returns) - outputs
            if unknown:
                raise ValueError(f"{self.name}: in-place form names unknown arguments {sorted(unknown)}")

    # -- schemas ------------------------------------------------------------------------------------------------

    def torch_schema(self) -> str:
        """The torch.library schema of the functional op: ``(Tensor q, ..., str policy) -> (Tensor, Tensor)``."""
        args = [f"Tensor {a.name}" for a in self.inputs] + [f"str {a.name}" for a in self.attributes]
        return f"({', '.join(args)}) -> {self._returns(len(self.outputs))}"

    def inplace_schema(self) -> str:
        """The schema of the in-place form: written inputs annotated ``Tensor(a!)``, ``Tensor(b!)``, ..."""
        if self.inplace is None:
            raise ValueError(f"{self.name} has no in-place form")
        aliases = iter("abcdefghijklmnopqrstuvwxyz")
        args = [f"Tensor({next(aliases)}!) {a.name}" if a.name in self.inplace.writes else f"Tensor {a.name}"
                for a in self.inputs] + [f"str {a.name}" for a in self.attributes]
        return f"({', '.join(args)}) -> {self._returns(len(self.inplace.returns))}"

    @staticmethod
    def _returns(count: int) -> str:
        return "Tensor" if count == 1 else f"({', '.join(['Tensor'] * count)})"

    def arg(self, name: str) -> Arg:
        for a in (*self.inputs, *self.outputs):
            if a.name == name:
                return a
        raise KeyError(name)

    # -- the input check ----------------------------------------------------------------------------------------

    def check(self, inputs: Sequence[Any], attributes: Mapping[str, str] | None = None, *,
              float_dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, values: bool | None = None,
              require: Callable[[Any, Callable[[], str]], None] | None = None, prefix: str | None = None,
              bool_dtype: torch.dtype = torch.bool) -> dict[str, Any]:
        """Check one call's inputs (torch tensors, in spec order) and attributes against the preconditions.

        Args:
            float_dtypes: the float dtypes the calling implementation has kernels for.
            values: check the :class:`Bound` preconditions on the values (default: when every bounded input is a
                real tensor on the CPU; a device implementation refuses in the kernel instead, see the module doc).
            require: ``require(condition, message)`` fails on a false condition; default: raise
                :class:`~ham_export.errors.InputError`. The fake kernels pass ``torch._check``-like, so that symbolic
                sizes become guards.
            prefix: the op name in messages (default ``ham::<torch_name>``).
            bool_dtype: the dtype that stands for a bool input (``torch.int32`` for the TensorRT plugins, which take
                no bool I/O).

        Returns:
            the size of every letter, e.g. ``{"B": 2, "H": 4, ...}`` (SymInts under tracing).
        """
        who = prefix or f"{TORCH_NAMESPACE}::{self.torch_name}"
        fail = require or _raise
        if len(inputs) != len(self.inputs):
            fail(False, lambda: f"{who}: takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), got "
                                f"{len(inputs)}")
        dims: dict[str, Any] = {}
        first: dict[str, str] = {}
        float_input: tuple[str, torch.dtype] | None = None
        for arg, x in zip(self.inputs, inputs, strict=True):
            if not isinstance(x, torch.Tensor):
                fail(False, lambda arg=arg, x=x: f"{who}: input '{arg.name}' must be a tensor, got "
                                                  f"{type(x).__name__}")
            where = f"{who}: input '{arg.name}'"
            # dtype
            if arg.dtype == "T":
                if float_input is None:
                    fail(x.dtype in float_dtypes, lambda where=where, x=x: (
                        f"{where} is {dtype_name(x.dtype)}; the float inputs must be "
                        f"{' or '.join(dtype_name(d) for d in float_dtypes)}"))
                    float_input = (arg.name, x.dtype)
                else:
                    fail(x.dtype == float_input[1], lambda where=where, x=x, f=float_input: (
                        f"{where} is {dtype_name(x.dtype)}, expected {dtype_name(f[1])} like input '{f[0]}'"))
            else:
                want = bool_dtype if arg.dtype == "bool" else getattr(torch, arg.dtype)
                fail(x.dtype == want, lambda where=where, x=x, want=want: (
                    f"{where} is {dtype_name(x.dtype)}, expected {dtype_name(want)}"))
            # rank and sizes
            shape = tuple(x.shape)
            fail(len(shape) == len(arg.shape), lambda where=where, shape=shape, arg=arg: (
                f"{where} has shape {_shape(shape)} (rank {len(shape)}), expected rank {len(arg.shape)}: "
                f"[{arg.letters}]"))
            for letter, size in zip(arg.shape, shape, strict=True):
                if letter not in dims:
                    fail(size >= MIN_SIZE, lambda where=where, shape=shape, letter=letter: (
                        f"{where} has shape {_shape(shape)}: {letter} must be at least {MIN_SIZE}"))
                    dims[letter], first[letter] = size, arg.name
                else:
                    fail(size == dims[letter], lambda where=where, shape=shape, arg=arg, letter=letter: (
                        f"{where} has shape {_shape(shape)}, expected [{arg.letters}] with {letter} = "
                        f"{dims[letter]} (from input '{first[letter]}')"))
        self.check_attributes(attributes, require=fail, prefix=who)
        named = dict(zip(self.input_names, inputs, strict=True))
        for bound in self.bounds:
            x = named[bound.arg]
            if values is False or (values is None and not host_visible(x)):
                continue
            high = dims[bound.high]
            bad = ((x < bound.low) | (x > high)).nonzero()
            if bad.numel():
                index = tuple(int(i) for i in bad[0])
                fail(False, lambda x=x, index=index, bound=bound, high=high: (
                    f"{who}: input '{bound.arg}' holds {int(x[index])} at batch {index[0]}, outside "
                    f"[{bound.low}, {bound.high}] with {bound.high} = {high}"))
        return dims

    def check_attributes(self, attributes: Mapping[str, str] | None, *,
                         require: Callable[[Any, Callable[[], str]], None] | None = None, prefix: str | None = None
                         ) -> None:
        """Each attribute is one of its choices (part of :meth:`check`; the ONNX translations call it alone)."""
        who = prefix or f"{TORCH_NAMESPACE}::{self.torch_name}"
        fail = require or _raise
        for attr in self.attributes:
            value = (attributes or {}).get(attr.name)
            fail(value in attr.choices, lambda attr=attr, value=value: (
                f"{who}: attribute '{attr.name}' is {'missing' if value is None else repr(value)}; it must be "
                f"{' or '.join(repr(c) for c in attr.choices)}"))


def host_visible(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read here without a device synchronisation or a trace: a real CPU tensor."""
    from torch._subclasses.fake_tensor import FakeTensor

    return x.device.type == "cpu" and not isinstance(x, FakeTensor)


def _raise(condition: Any, message: Callable[[], str]) -> None:
    if not condition:
        raise InputError(message())


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


LENGTH_BOUND = Bound("length", 0, "C", "valid cache entries: never negative, never past the capacity")
DEVICE_REFUSAL = ("a device kernel that finds length[b] outside [0, C] leaves row b untouched (no read, no write), "
                  f"writes NaN to its attention output and {INVALID_LENGTH} to its overflow")

CACHE_ATTENTION = OpSpec(
    name="CacheAttention",
    torch_name="cache_attention",
    version=1,
    inputs=(
        Arg("q", "T", "BHTK", "queries of the new tokens"),
        Arg("k_cache", "T", "BHCK", "cached keys; entries past length do not count (every implementation but the "
                                    "opset-27 ONNX decode form never reads them; that one weights them by exactly 0, "
                                    "so they must be finite)"),
        Arg("v_cache", "T", "BHCV", "cached values"),
        Arg("length", "int64", "B", "valid cache entries"),
        Arg("k", "T", "BHTK", "keys of the new tokens"),
        Arg("v", "T", "BHTV", "values of the new tokens"),
        Arg("routed", "bool", "BT", "which new tokens are routed to the cache"),
        Arg("scale", "T", "H", "per-head logit scale"),
    ),
    outputs=(Arg("o", "T", "BHTV", "attention output; 0 where a query sees no key"),),
    bounds=(LENGTH_BOUND,),
    doc="Query t attends over cache entries [0, length) and the routed new tokens s <= t.",
    refusal=DEVICE_REFUSAL,
)

CACHE_APPEND = OpSpec(
    name="CacheAppend",
    torch_name="cache_append",
    version=1,
    inputs=(
        Arg("k_cache", "T", "BHCK"),
        Arg("v_cache", "T", "BHCV"),
        Arg("score_cache", "T", "BC", "router score of each cached entry (for evict)"),
        Arg("length", "int64", "B"),
        Arg("k", "T", "BHTK"),
        Arg("v", "T", "BHTV"),
        Arg("score", "T", "BT", "router score of each new token"),
        Arg("routed", "bool", "BT"),
    ),
    outputs=(
        Arg("k_cache_out", "T", "BHCK"),
        Arg("v_cache_out", "T", "BHCV"),
        Arg("score_cache_out", "T", "BC"),
        Arg("length_out", "int64", "B"),
        Arg("overflow", "int64", "B", f"routed tokens of this call that found the cache full ({INVALID_LENGTH}: a "
                                      f"row refused for an invalid length)"),
    ),
    attributes=(Attr("policy", ("drop", "evict"),
                     f"drop: a token that finds the cache full is not stored; evict: it replaces the entry with the "
                     f"lowest score key, the lowest slot among equal keys, if its own key is strictly higher (key: "
                     f"floor(float32(score) * {EVICT_GRID} + 0.5); a NaN score is the lowest and is never replaced)"),),
    bounds=(LENGTH_BOUND,),
    inplace=InPlace("cache_append_", writes=("k_cache", "v_cache", "score_cache", "length"), returns=("overflow",),
                    doc="writes the new entries and the new length into the given caches; returns overflow"),
    doc="Store the routed new tokens at [length, ...) in order; at capacity the policy applies.",
    refusal=DEVICE_REFUSAL,
)

GDN_PREFILL = OpSpec(
    name="GdnPrefill",
    torch_name="gdn_prefill",
    version=1,
    inputs=(
        Arg("q", "T", "BTHK", "unit queries"),
        Arg("k", "T", "BTHK", "unit keys"),
        Arg("v", "T", "BTHV"),
        Arg("g", "T", "BTH", "log decay, alpha = exp(g)"),
        Arg("beta", "T", "BTH", "write strength"),
        Arg("state", "T", "BHKV", "GDN state before the first token"),
    ),
    outputs=(
        Arg("o", "T", "BTHV", "read-out (q^T S_t) / sqrt(K)"),
        Arg("vhat", "T", "BTHV", "prediction alpha_t (k_t^T S_{t-1}), for the router"),
        Arg("state_out", "T", "BHKV"),
    ),
    doc="The gated delta rule over T tokens from a given state.",
)

OPS = (CACHE_ATTENTION, CACHE_APPEND, GDN_PREFILL)
POLICIES = CACHE_APPEND.attributes[0].choices
