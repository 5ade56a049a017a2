"""Each HAM op's TensorRT plugin, made from its op spec (:mod:`ham_export.ops.spec`).

TensorRT's ONNX parser turns a node into a plugin when its op type, ``plugin_version`` and ``plugin_namespace``
match a registered creator exactly; it ignores the node's domain, and a built-in importer wins for a standard op
type, so every plugin gets an op type of its own (``Ham`` + the ONNX op name). Plugin I/O cannot be bool or uint8:
a bool input (``routed``) becomes int32, and the rewritten graph casts it. The caches of ``CacheAppend`` are aliased
outputs (TensorRT's preview feature ``ALIASED_PLUGIN_IO_10_03``): bound to one buffer with their inputs, the plugin
writes only the new entries. The cache length is never aliased: a program of one batch row would read it while
another writes it; it is a separate output.
"""

from __future__ import annotations

from dataclasses import dataclass

from ham_export.ops.spec import CACHE_APPEND, CACHE_ATTENTION, GDN_PREFILL, OPS, OpSpec

QDP_NAMESPACE = "ham"  # Quickly Deployable Plugins (Python, AOT); "ham.ai" is no valid QDP namespace (no dots)
CPP_NAMESPACE = "ham_cpp"  # the C++ library: another namespace, so that both can be registered in one process
MODES = ("qdp", "cpp")
NAMESPACES = {"qdp": QDP_NAMESPACE, "cpp": CPP_NAMESPACE}
PLUGIN_DTYPES = {"T": "T", "int64": "int64", "bool": "int32"}  # TensorRT plugins take no bool I/O


@dataclass(frozen=True)
class PluginSpec:
    """One op's plugin: its name (the rewritten node's op type), version, I/O dtypes and aliases."""

    op: OpSpec
    name: str
    version: str
    input_dtypes: tuple[str, ...]  # "T", "int64" or "int32", in the op's input order
    output_dtypes: tuple[str, ...]
    aliases: dict[int, int]  # output index -> the input index it aliases (in place)

    def plugin_id(self, mode: str) -> str:
        """``namespace::name`` (the QDP id)."""
        return f"{NAMESPACES[mode]}::{self.name}"

    @property
    def cast_inputs(self) -> tuple[int, ...]:
        """The inputs whose dtype the rewrite changes (bool -> int32)."""
        return tuple(i for i, a in enumerate(self.op.inputs) if a.dtype != PLUGIN_DTYPES[a.dtype])


def _aliases(op: OpSpec) -> dict[int, int]:
    if op.inplace is None:
        return {}
    inputs = {a.name: i for i, a in enumerate(op.inputs)}
    outputs = {a.name: i for i, a in enumerate(op.outputs)}
    # the written caches keep their storage; the length is a separate output (see the module doc)
    return {outputs[f"{name}_out"]: inputs[name] for name in op.inplace.writes
            if name != "length" and f"{name}_out" in outputs}


def plugin_spec(op: OpSpec) -> PluginSpec:
    return PluginSpec(op=op, name=f"Ham{op.name}", version=str(op.version),
                      input_dtypes=tuple(PLUGIN_DTYPES[a.dtype] for a in op.inputs),
                      output_dtypes=tuple(PLUGIN_DTYPES[a.dtype] for a in op.outputs), aliases=_aliases(op))


PLUGINS = {op.name: plugin_spec(op) for op in OPS}
CACHE_ATTENTION_PLUGIN = PLUGINS[CACHE_ATTENTION.name]
CACHE_APPEND_PLUGIN = PLUGINS[CACHE_APPEND.name]
GDN_PREFILL_PLUGIN = PLUGINS[GDN_PREFILL.name]


def letter_sources(plugin: PluginSpec) -> dict[str, tuple[int, int]]:
    """Where each shape letter is first seen: ``{letter: (input index, dimension)}``, as the op spec binds them."""
    where: dict[str, tuple[int, int]] = {}
    for i, arg in enumerate(plugin.op.inputs):
        for d, letter in enumerate(arg.shape):
            where.setdefault(letter, (i, d))
    return where


def output_shapes(plugin: PluginSpec, input_shapes: list) -> list[tuple]:
    """Each output's shape from the inputs' (ints, or TensorRT's shape expressions): the op spec's letters."""
    where = letter_sources(plugin)
    return [tuple(input_shapes[where[letter][0]][where[letter][1]] for letter in arg.shape)
            for arg in plugin.op.outputs]


def first_float_input(plugin: PluginSpec) -> int:
    """The input whose dtype is the op's float type T."""
    return next(i for i, kind in enumerate(plugin.input_dtypes) if kind == "T")
