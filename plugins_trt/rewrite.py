"""The custom-op ONNX graph rewritten into the nodes TensorRT's parser turns into plugins (onnx-graphsurgeon).

Each ``ham.ai`` node becomes its plugin's node (:mod:`.specs`): op type ``Ham<Op>``, attributes ``plugin_version``
and ``plugin_namespace`` (``ham`` for the Quickly Deployable Plugins, which also get ``aot = 1``, the parser's flag
for their ahead-of-time implementation; ``ham_cpp`` for the C++ library), the op's own attributes kept. A bool input
gets a ``Cast`` to int32 in front of it. The nodes move to the domain ``ham.trt`` (TensorRT ignores domains; ONNX
needs one with a schema, registered here from the op specs, so that the graph passes ``onnx.checker``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.defs import OpSchema

from ham_export.ops.spec import ONNX_DOMAIN, OPS

from .specs import MODES, NAMESPACES, PLUGINS, PluginSpec

TRT_DOMAIN = "ham.trt"
TRT_DOMAIN_VERSION = 1
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_TYPE = {"T": "T", "int64": "tensor(int64)", "int32": "tensor(int32)"}


def schema(plugin: PluginSpec) -> OpSchema:
    """The ONNX schema of a plugin node: the op's inputs and outputs (bool as int32), its attributes, and the
    parser's ``plugin_version``, ``plugin_namespace`` and (for the QDP form) ``aot``."""
    op = plugin.op
    attributes = [OpSchema.Attribute(a.name, OpSchema.AttrType.STRING, a.doc, required=True) for a in op.attributes]
    attributes += [
        OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "the plugin's version", required=True),
        OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "ham (QDP) or ham_cpp (C++ library)",
                           required=True),
        OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: the QDP's ahead-of-time implementation",
                           required=False),
    ]
    return OpSchema(
        plugin.name, TRT_DOMAIN, TRT_DOMAIN_VERSION, f"TensorRT plugin of {ONNX_DOMAIN}::{op.name}. {op.doc}",
        inputs=[OpSchema.FormalParameter(a.name, _TYPE[d], a.doc) for a, d in zip(op.inputs, plugin.input_dtypes,
                                                                                  strict=True)],
        outputs=[OpSchema.FormalParameter(a.name, _TYPE[d], a.doc) for a, d in zip(op.outputs,
                                                                                   plugin.output_dtypes, strict=True)],
        type_constraints=[("T", FLOAT_TYPES, "the op's float type")],
        attributes=attributes,
    )


def register_schemas() -> None:
    """Register every plugin node's schema with ``onnx.defs`` (idempotent)."""
    for plugin in PLUGINS.values():
        if not onnx.defs.has(plugin.name, TRT_DOMAIN_VERSION, TRT_DOMAIN):
            onnx.defs.register_schema(schema(plugin))


def to_tensorrt(model: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    """The graph with every ``ham.ai`` node replaced by its plugin node for ``mode`` (``qdp`` or ``cpp``)."""
    import onnx_graphsurgeon as gs

    if mode not in MODES:
        raise ValueError(f"plugin mode must be one of {', '.join(MODES)}, got {mode!r}")
    register_schemas()
    graph = gs.import_onnx(model)
    for node in list(graph.nodes):
        if node.domain != ONNX_DOMAIN:
            continue
        plugin = PLUGINS[node.op]
        for i in plugin.cast_inputs:
            source = node.inputs[i]
            cast = gs.Variable(f"{node.name}/{plugin.op.inputs[i].name}_int32", dtype=np.int32, shape=source.shape)
            graph.nodes.append(gs.Node("Cast", name=f"{node.name}/cast_{plugin.op.inputs[i].name}", inputs=[source],
                                       outputs=[cast], attrs={"to": onnx.TensorProto.INT32}))
            node.inputs[i] = cast
        node.op = plugin.name
        node.domain = TRT_DOMAIN
        node.attrs["plugin_version"] = plugin.version
        node.attrs["plugin_namespace"] = NAMESPACES[mode]
        if mode == "qdp":
            node.attrs["aot"] = 1
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    imports = [o for o in out.opset_import if o.domain not in (ONNX_DOMAIN, TRT_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend([*imports, onnx.helper.make_opsetid(TRT_DOMAIN, TRT_DOMAIN_VERSION)])
    out.ir_version = model.ir_version
    return out


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The plugin nodes of a rewritten graph."""
    names = {p.name for p in PLUGINS.values()}
    return [n for n in model.graph.node if n.domain == TRT_DOMAIN and n.op_type in names]


__all__ = ["OPS", "TRT_DOMAIN", "plugin_nodes", "register_schemas", "schema", "to_tensorrt"]
