"""The ONNX graphs rewritten for TensorRT: they pass ``onnx.checker``, and every plugin node is its op spec's plugin
(name, version, namespace, attributes, I/O dtypes), with no bool or uint8 plugin I/O."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from ham_export.ops.spec import ONNX_DOMAIN
from ham_export.plugins_trt.rewrite import TRT_DOMAIN, plugin_nodes, register_schemas, to_tensorrt
from ham_export.plugins_trt.specs import NAMESPACES, PLUGINS

PROGRAMS = ("prefill", "decode")
ELEMENT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
KIND = {"int64": TensorProto.INT64, "int32": TensorProto.INT32}
SETTINGS = {"qdp": ("fp16", "evict"), "cpp": ("fp32", "drop")}  # as the prepared fixture builds them
BY_NAME = {p.name: p for p in PLUGINS.values()}


def load(folder, program) -> onnx.ModelProto:
    register_schemas()
    return onnx.load(str(folder / f"{program}.trt.onnx"))


def element_types(model: onnx.ModelProto, dtype: str) -> dict[str, int]:
    """Each value's element type: inferred for the standard ops, from the plugin specs for the plugins' outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in plugin_nodes(model):
        plugin = BY_NAME[node.op_type]
        for name, kind in zip(node.output, plugin.output_dtypes, strict=True):
            types[name] = ELEMENT[dtype] if kind == "T" else KIND[kind]
    return {k: v for k, v in types.items() if v}


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", ["qdp", "cpp"])
def test_the_rewritten_graph_passes_the_checker(prepared, mode, program):
    onnx.checker.check_model(load(prepared[mode], program), full_check=True)


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", ["qdp", "cpp"])
def test_every_plugin_node_matches_its_spec(prepared, mode, program):
    dtype, policy = SETTINGS[mode]
    model = load(prepared[mode], program)
    assert not [n for n in model.graph.node if n.domain == ONNX_DOMAIN], "a ham.ai node was left"
    assert ONNX_DOMAIN not in {o.domain for o in model.opset_import}
    nodes = plugin_nodes(model)
    counts = {name: sum(n.op_type == name for n in nodes) for name in BY_NAME}
    layers = 2
    want = {"HamCacheAttention": layers, "HamCacheAppend": layers, "HamGdnPrefill": layers if program == "prefill"
            else 0}
    assert counts == want
    types = element_types(model, dtype)
    for node in nodes:
        plugin = BY_NAME[node.op_type]
        assert node.domain == TRT_DOMAIN
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        expected = {"plugin_version": plugin.version.encode(), "plugin_namespace": NAMESPACES[mode].encode(),
                    **({"aot": 1} if mode == "qdp" else {}),
                    **{a.name: policy.encode() for a in plugin.op.attributes}}
        assert attrs == expected, node.name
        assert len(node.input) == len(plugin.op.inputs) and len(node.output) == len(plugin.op.outputs)
        for name, kind in zip(node.input, plugin.input_dtypes, strict=True):
            assert types[name] == (ELEMENT[dtype] if kind == "T" else KIND[kind]), (node.name, name)
            assert types[name] not in (TensorProto.BOOL, TensorProto.UINT8)
        for arg, name in zip(plugin.op.inputs, node.input, strict=True):
            if arg.dtype == "bool":  # cast to int32 right in front of the plugin
                producer = next(n for n in model.graph.node if name in n.output)
                assert producer.op_type == "Cast" and onnx.helper.get_attribute_value(producer.attribute[0]) == \
                    TensorProto.INT32


def test_the_caches_of_decode_are_graph_inputs_and_outputs_of_the_append(prepared):
    """What binding them in place needs: each append reads the past caches straight from the engine's inputs and
    writes the present caches straight to its outputs."""
    model = load(prepared["qdp"], "decode")
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    appends = [n for n in plugin_nodes(model) if n.op_type == "HamCacheAppend"]
    for layer, node in enumerate(appends):
        plugin = BY_NAME["HamCacheAppend"]
        for out, source in plugin.aliases.items():
            field = plugin.op.inputs[source].name
            assert node.input[source] == f"past.{layer}.{field}" and node.input[source] in inputs
            assert node.output[out] == f"present.{layer}.{field}" and node.output[out] in outputs


def test_the_dynamic_dims_carry_the_manifest_names(prepared):
    model = load(prepared["qdp"], "prefill")
    tokens = next(i for i in model.graph.input if i.name == "tokens")
    assert [d.dim_param for d in tokens.type.tensor_type.shape.dim] == ["B", "T"]


def test_an_unknown_mode_is_refused(prepared):
    with pytest.raises(ValueError, match="plugin mode must be one of qdp, cpp"):
        to_tensorrt(load(prepared["qdp"], "decode"), "none")
