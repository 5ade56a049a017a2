"""The ONNX translations of the HAM ops (:mod:`ham_export.ops.onnx`) beyond what the op suites check (they run the
standard forms as ``onnx-standard``, ``onnx-standard-decode`` and ``onnx-portable``, and the custom form through the
op library as ``ort``): the custom form is one ``ham.ai`` node per op with the spec's attributes and dynamic dims;
the standard form (opset 27) and the portable form (opset 18) hold only default-domain ops, a Loop only where an
evict append has a dynamic T (unrolled for a static decode T), and run the three ops in one graph as the model does;
the standard form's one-token graphs read the caches where they lie (no node copies a cache).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ham_export.ops import onnx as onnx_ops
from ham_export.ops import reference as ref
from ham_export.ops import spec as opspec
from ham_export.ops.libraries import ORT, ort_session_options

from .inputs import append, attention, gdn

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),  # torch.onnx notes dims named twice
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

B, H, C, T, K, V = 2, 2, 6, 5, 4, 3  # export example; B, T and C are dynamic
DIM_B, DIM_T, DIM_C = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("capacity")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


class Attention(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, length, k, v, routed, scale):
        return torch.ops.ham.cache_attention(q, k_cache, v_cache, length, k, v, routed, scale)


class Append(torch.nn.Module):
    def __init__(self, policy: str):
        super().__init__()
        self.policy = policy

    def forward(self, k_cache, v_cache, score_cache, length, k, v, score, routed):
        return torch.ops.ham.cache_append(k_cache, v_cache, score_cache, length, k, v, score, routed, self.policy)


class Prefill(torch.nn.Module):
    def forward(self, q, k, v, g, beta, state):
        return torch.ops.ham.gdn_prefill(q, k, v, g, beta, state)


class Layer(torch.nn.Module):
    """All three ops in one graph, with plain torch ops between them, as in a HAM layer."""

    def __init__(self, policy: str):
        super().__init__()
        self.policy = policy

    def forward(self, q, k, v, g, beta, state, k_cache, v_cache, score_cache, length, scale):
        o, vhat, state = torch.ops.ham.gdn_prefill(q, k, v, g, beta, state)
        score = 1.0 - torch.nn.functional.cosine_similarity(vhat, v, dim=-1).amin(-1)  # [B, T]
        routed = score >= 0.5
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        attn = torch.ops.ham.cache_attention(qh, k_cache, v_cache, length, kh, vh, routed, scale)
        k_cache, v_cache, score_cache, length, overflow = torch.ops.ham.cache_append(
            k_cache, v_cache, score_cache, length, kh, vh, score, routed, self.policy)
        return o + attn.transpose(1, 2), state, k_cache, v_cache, score_cache, length, overflow


# ------------------------------------------------------------------------------------------------- inputs


def attention_inputs(b, h, c, t, seed, lengths=None, dtype=torch.float32):
    return tuple(attention(b, h, t, c, K, V, lengths=lengths, routed_p=0.6, dtype=dtype, seed=seed))


def append_inputs(b, h, c, t, seed, lengths=None, ties=False, density=0.6, dtype=torch.float32):
    return tuple(append(b, h, t, c, K, V, lengths=lengths, routed_p=density, dtype=dtype, seed=seed, ties=ties))


def gdn_inputs(b, t, h, seed, dtype=torch.float32):
    return tuple(gdn(b, t, h, K, V, dtype=dtype, seed=seed))


ATTENTION_SHAPES = ({0: DIM_B, 2: DIM_T}, {0: DIM_B, 2: DIM_C}, {0: DIM_B, 2: DIM_C}, {0: DIM_B},
                    {0: DIM_B, 2: DIM_T}, {0: DIM_B, 2: DIM_T}, {0: DIM_B, 1: DIM_T}, None)
APPEND_SHAPES = ({0: DIM_B, 2: DIM_C}, {0: DIM_B, 2: DIM_C}, {0: DIM_B, 1: DIM_C}, {0: DIM_B},
                 {0: DIM_B, 2: DIM_T}, {0: DIM_B, 2: DIM_T}, {0: DIM_B, 1: DIM_T}, {0: DIM_B, 1: DIM_T})
GDN_SHAPES = ({0: DIM_B, 1: DIM_T},) * 5 + ({0: DIM_B},)


def example(kind: str, dtype=torch.float32):
    """The module, example inputs and dynamic shapes that a kind of op is exported with."""
    if kind == "attention":
        return Attention().eval(), attention_inputs(B, H, C, T, 0, dtype=dtype), ATTENTION_SHAPES
    if kind.startswith("append"):
        return Append(kind.split("_")[1]).eval(), append_inputs(B, H, C, T, 0, dtype=dtype), APPEND_SHAPES
    return Prefill().eval(), gdn_inputs(B, T, H, 0, dtype=dtype), GDN_SHAPES


# ------------------------------------------------------------------------------------------------ helpers


def all_nodes(graph: onnx.GraphProto):
    """Every node of a graph and of its subgraphs (Loop and Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def session(model: onnx.ModelProto, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, args) -> list[torch.Tensor]:
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
    return [torch.from_numpy(np.asarray(x)) for x in sess.run(None, feeds)]


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def reference(kind: str, args):
    """The op's reference, in float32 (inputs upcast), as a tuple."""
    args32 = [a.float() if a.is_floating_point() else a for a in args]
    if kind == "attention":
        return (ref.cache_attention(*args32),)
    if kind.startswith("append"):
        return ref.cache_append(*args32, kind.split("_")[1])
    return ref.gdn_chunked(*args32)


def check_against_reference(kind: str, sess: ort.InferenceSession, args, dtype=torch.float32) -> None:
    got = run(sess, args)
    expected = reference(kind, args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        if kind.startswith("append"):  # data movement and integer bookkeeping: exact, NaN tails kept as they came
            assert g.dtype == (dtype if e.is_floating_point() else e.dtype)
            torch.testing.assert_close(g, e.to(g.dtype), rtol=0, atol=0, equal_nan=True)
        else:
            assert g.dtype == dtype and bool(g.isfinite().all())
            torch.testing.assert_close(g.float(), e, rtol=ATOL[dtype], atol=ATOL[dtype])


# ------------------------------------------------------------------------------------------------ exports

KINDS = ("attention", "append_drop", "append_evict", "gdn")


@pytest.fixture(scope="module")
def exported():
    """kind, form, dtype -> ONNX model, exported on first use."""
    cache: dict[tuple, onnx.ModelProto] = {}

    def get(kind: str, form: str, dtype=torch.float32) -> onnx.ModelProto:
        key = (kind, form, dtype)
        if key not in cache:
            module, args, shapes = example(kind, dtype)
            cache[key] = onnx_ops.export_ops_model(module, args, form, shapes)
        return cache[key]
    return get


@pytest.mark.parametrize("kind", KINDS)
def test_custom_form_is_one_ham_node_with_dynamic_dims(exported, kind):
    model = exported(kind, "custom")  # export_ops_model ran check_model(full_check=True)
    spec = {"attention": opspec.CACHE_ATTENTION, "gdn": opspec.GDN_PREFILL}.get(kind, opspec.CACHE_APPEND)
    [node] = [n for n in model.graph.node if n.domain == opspec.ONNX_DOMAIN]
    assert node.op_type == spec.name and len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)
    assert {o.domain: o.version for o in model.opset_import}[opspec.ONNX_DOMAIN] == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if spec is opspec.CACHE_APPEND:
        assert attrs == {"policy": kind.split("_")[1].encode()}
    else:
        assert attrs == {}
    dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    assert len(dims) == (2 if kind == "gdn" else 3)  # batch, tokens (and capacity)
    for out in model.graph.output:  # typed outputs
        assert out.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)


def test_custom_form_float16(exported):
    model = exported("append_evict", "custom", torch.float16)
    [node] = [n for n in model.graph.node if n.domain == opspec.ONNX_DOMAIN]
    assert node.op_type == "CacheAppend"
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT16] * 3 + [
        onnx.TensorProto.INT64] * 2


def test_custom_form_without_the_op_library_fails_to_load(exported):
    with pytest.raises(Exception, match=r"ham\.ai"):
        session(exported("attention", "custom"))


@pytest.mark.parametrize("kind", KINDS)
def test_custom_form_runs_with_the_op_library(exported, kind):
    if not ORT.path().is_file():
        pytest.skip(f"ham.ai op library not built at {ORT.path()} ({ORT.build})")
    options = ort_session_options()
    sess = session(exported(kind, "custom"), options)
    for seed, (b, c, t) in enumerate([(1, 3, 1), (3, 4, 7)]):
        if kind == "gdn":
            args = gdn_inputs(b, t, H, seed)
        elif kind == "attention":
            args = attention_inputs(b, H, c, t, seed)
        else:
            args = append_inputs(b, H, c, t, seed)
        check_against_reference(kind, sess, args)


STANDARD_FORMS = ("standard", "portable")
CONTROL = {"standard": {"append_evict": {"Loop"}}, "portable": {"gdn": {"Scan"}, "append_evict": {"Loop"}}}
OPSET27_NODES = {"attention": "Attention", "gdn": "LinearAttention"}


@pytest.mark.parametrize("form", STANDARD_FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_standard_forms_have_only_default_domain_ops(exported, kind, form):
    model = exported(kind, form)
    assert {o.domain: o.version for o in model.opset_import} == {"": onnx_ops.OPSETS[form]} and not model.functions
    ops = {n.op_type for n in all_nodes(model.graph)}
    assert all(n.domain in ("", "ai.onnx") for n in all_nodes(model.graph))
    assert {"Loop", "Scan", "If"} & ops == CONTROL[form].get(kind, set())
    if form == "standard" and kind in OPSET27_NODES:
        assert OPSET27_NODES[kind] in ops


@pytest.mark.parametrize("form", STANDARD_FORMS)
@pytest.mark.parametrize("t", [1, 3])
def test_static_t_evict_is_unrolled(t, form):
    """A decode-shaped append (static T, here 1 or 3) has no control flow, so that importers without Loop take it."""
    module = Append("evict").eval()
    args = append_inputs(B, H, C, t, 0)
    shapes = APPEND_SHAPES[:4] + ({0: DIM_B},) * 4
    model = onnx_ops.export_ops_model(module, args, form, shapes)
    assert not {"Loop", "Scan", "If"} & {n.op_type for n in all_nodes(model.graph)}
    sess = session(model)
    for seed in range(12):
        for lengths in ([4, 5], [5, 5], [2, 0]):
            check_against_reference("append_evict", sess, append_inputs(2, H, 5, t, seed, lengths=lengths,
                                                                         ties=seed % 2 == 0, density=0.8))


def test_standard_decode_reads_the_caches_where_they_lie():
    """One new token, drop: the attention reads each cache through a MatMul and the append writes one row of it
    with TensorScatter; no node that copies a whole cache (Concat, Where, Cast, Transpose, ...) takes one (Shape
    reads no data)."""
    module = Layer("drop").eval()
    q, k, v, g, beta, state = gdn_inputs(B, 1, H, 0)
    k_cache, v_cache, score_cache, length, *_ = append_inputs(B, H, C, 1, 0)
    args = (q, k, v, g, beta, state, k_cache, v_cache, score_cache, length, torch.tensor([2.0, 5.0]))
    shapes = ({0: DIM_B},) * 6 + APPEND_SHAPES[:4] + (None,)
    model = onnx_ops.export_ops_model(module, args, "standard", shapes)
    caches = [i.name for i in model.graph.input[6:9]]
    readers = {name: sorted(n.op_type for n in model.graph.node if name in n.input and n.op_type != "Shape")
               for name in caches}
    assert readers == {caches[0]: ["GatherElements", "MatMul", "TensorScatter"],
                       caches[1]: ["GatherElements", "MatMul", "TensorScatter"],
                       caches[2]: ["GatherElements", "TensorScatter"]}, readers
    sess = session(model)
    for seed, fill in enumerate([0, 3, C]):  # empty, part full, full (the routed tokens are dropped)
        q, k, v, g, beta, state = gdn_inputs(B, 1, H, seed)
        k_cache, v_cache, score_cache, length, *_ = append_inputs(B, H, C, 1, seed, lengths=[fill] * B)
        case = [q, k, v, g, beta, state, *(x.nan_to_num(nan=3.0) for x in (k_cache, v_cache, score_cache)), length,
                args[-1]]
        with torch.no_grad():
            expected = module(*case)
        for got, e in zip(run(sess, case), expected, strict=True):
            torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", STANDARD_FORMS)
def test_ops_in_one_graph(tmp_path, form):
    module = Layer("evict").eval()
    q, k, v, g, beta, state = gdn_inputs(B, T, H, 1)
    k_cache, v_cache, score_cache, length, *_ = append_inputs(B, H, C, T, 1)
    scale = torch.tensor([2.0, 5.0])
    args = (q, k, v, g, beta, state, k_cache, v_cache, score_cache, length, scale)
    shapes = GDN_SHAPES + APPEND_SHAPES[:4] + (None,)
    custom = onnx_ops.export_ops_model(module, args, "custom", shapes, tmp_path / "custom.onnx")
    assert sorted(n.op_type for n in custom.graph.node if n.domain == "ham.ai") == [
        "CacheAppend", "CacheAttention", "GdnPrefill"]
    onnx.checker.check_model(str(tmp_path / "custom.onnx"), full_check=True)
    standard = onnx_ops.export_ops_model(module, args, form, shapes)
    sess = session(standard)
    for seed, (b, c, t, fill) in enumerate([(1, 3, 1, 3), (3, 4, 9, 2), (2, 8, 4, 0)]):
        q, k, v, g, beta, state = gdn_inputs(b, t, H, seed)
        k_cache, v_cache, score_cache, length, *_ = append_inputs(b, H, c, t, seed, lengths=[fill] * b)
        case = (q, k, v, g, beta, state, k_cache, v_cache, score_cache, length, scale)
        with torch.no_grad():
            expected = module(*case)
        for got, e in zip(run(sess, case), expected, strict=True):
            torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_bad_form_and_policy_are_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        onnx_ops.translation_table("plugin")
    with pytest.raises(ValueError, match="CacheAppend: attribute 'policy' is 'lru'; it must be 'drop' or 'evict'"):
        onnx_ops.cache_append_standard(*([None] * 8), "lru")
    with pytest.raises(ValueError, match="CacheAppend: attribute 'policy' is 'lru'"):
        onnx_ops.cache_append_portable(*([None] * 8), "lru")
    with pytest.raises(ValueError, match="CacheAppend: attribute 'policy' is 'lru'"):
        onnx_ops.cache_append_custom(*([None] * 8), "lru")
