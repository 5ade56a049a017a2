"""The ONNX translations of the HAM ops: schemas, the custom form and the standard form against the reference.

Each op is exported once per form (module-scoped fixtures) with dynamic batch, T and C, then run in ONNX Runtime
at other shapes: T = 1 and T > 1, empty, partial and full caches with NaN past the length, both append policies
with overflow, score ties for evict. The custom form runs only where the ham.ai op library is built.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ham_export import onnx_ops, opspec
from ham_export import reference as ref

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),  # torch.onnx notes dims named twice
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

B, H, C, T, K, V = 2, 2, 6, 5, 4, 3  # export example; B, T and C are dynamic
DIM_B, DIM_T, DIM_C = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("capacity")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


# ------------------------------------------------------------------------------------------------ modules


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


def nan_tail(x: torch.Tensor, length: torch.Tensor, axis: int) -> torch.Tensor:
    """x with NaN at positions >= length[b] along ``axis`` (a cache that was never written there)."""
    pos = torch.arange(x.shape[axis]).view(*([1] * axis), -1, *([1] * (x.dim() - axis - 1)))
    lim = length.view(-1, *([1] * (x.dim() - 1)))
    return x.masked_fill(pos >= lim, float("nan"))


def attention_inputs(b, h, c, t, seed, lengths=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    length = torch.tensor(lengths) if lengths is not None else torch.randint(0, c + 1, (b,), generator=gen)
    q, k = (ref.l2_normalize(torch.randn(b, h, t, K, generator=gen)) for _ in range(2))
    v = torch.randn(b, h, t, V, generator=gen)
    k_cache = nan_tail(ref.l2_normalize(torch.randn(b, h, c, K, generator=gen)), length, 2)
    v_cache = nan_tail(torch.randn(b, h, c, V, generator=gen), length, 2)
    routed = torch.rand(b, t, generator=gen) > 0.4
    scale = 1.0 + 4.0 * torch.rand(h, generator=gen)
    args = (q, k_cache, v_cache, length, k, v, routed, scale)
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in args)


def append_inputs(b, h, c, t, seed, lengths=None, ties=False, density=0.6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    length = torch.tensor(lengths) if lengths is not None else torch.randint(0, c + 1, (b,), generator=gen)
    rand_scores = (lambda *s: torch.randint(0, 4, s, generator=gen) / 4) if ties else (
        lambda *s: torch.rand(*s, generator=gen))
    k_cache = nan_tail(torch.randn(b, h, c, K, generator=gen), length, 2)
    v_cache = nan_tail(torch.randn(b, h, c, V, generator=gen), length, 2)
    score_cache = nan_tail(rand_scores(b, c), length, 1)
    k, v = torch.randn(b, h, t, K, generator=gen), torch.randn(b, h, t, V, generator=gen)
    score = rand_scores(b, t)
    routed = torch.rand(b, t, generator=gen) < density
    args = (k_cache, v_cache, score_cache, length, k, v, score, routed)
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in args)


def gdn_inputs(b, t, h, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (ref.l2_normalize(torch.randn(b, t, h, K, generator=gen)) for _ in range(2))
    v = torch.randn(b, t, h, V, generator=gen)
    g = -0.7 * torch.rand(b, t, h, generator=gen)
    beta = torch.rand(b, t, h, generator=gen)
    state = torch.randn(b, h, K, V, generator=gen)
    return tuple(x.to(dtype) for x in (q, k, v, g, beta, state))


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


@pytest.fixture(scope="module")
def standard_session(exported):
    cache: dict[tuple, ort.InferenceSession] = {}

    def get(kind: str, dtype=torch.float32) -> ort.InferenceSession:
        if (kind, dtype) not in cache:
            cache[kind, dtype] = session(exported(kind, "standard", dtype))
        return cache[kind, dtype]
    return get


# -------------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("spec", opspec.OPS, ids=lambda s: s.name)
def test_schema_follows_the_spec(spec):
    onnx_ops.register_schemas()
    onnx_ops.register_schemas()  # idempotent
    schema = onnx.defs.get_schema(spec.name, spec.version, opspec.ONNX_DOMAIN)
    assert (schema.name, schema.domain, schema.since_version) == (spec.name, "ham.ai", 1)
    types = {"T": "T", "int64": "tensor(int64)", "bool": "tensor(bool)"}
    assert [(p.name, p.type_str) for p in schema.inputs] == [(a.name, types[a.dtype]) for a in spec.inputs]
    assert [(p.name, p.type_str) for p in schema.outputs] == [(a.name, types[a.dtype]) for a in spec.outputs]
    [constraint] = schema.type_constraints
    assert constraint.type_param_str == "T"
    assert sorted(constraint.allowed_type_strs) == ["tensor(float)", "tensor(float16)"]
    assert sorted(schema.attributes) == sorted(a.name for a in spec.attributes)
    for attr in spec.attributes:
        assert schema.attributes[attr.name].required
        assert schema.attributes[attr.name].type == onnx.defs.OpSchema.AttrType.STRING


def test_translation_arguments_copy_the_reference_order():
    for form in onnx_ops.FORMS:
        table = onnx_ops.translation_table(form)
        for spec in opspec.OPS:
            fn = table[getattr(torch.ops.ham, spec.torch_name).default]
            names = list(inspect.signature(fn).parameters)
            assert names == [a.name for a in spec.inputs] + [a.name for a in spec.attributes]
            assert names == list(inspect.signature(getattr(ref, spec.torch_name, ref.gdn_chunked)).parameters
                                 )[:len(names)]


def test_bad_form_and_policy_are_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        onnx_ops.translation_table("plugin")
    with pytest.raises(ValueError, match="policy must be one of"):
        onnx_ops.cache_append_standard(*([None] * 8), "lru")
    with pytest.raises(ValueError, match="policy must be one of"):
        onnx_ops.cache_append_custom(*([None] * 8), "lru")


# ---------------------------------------------------------------------------------------------- custom form


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


def _ort_ops_options() -> ort.SessionOptions:
    try:
        from ham_export import ort_ops
    except ImportError as e:
        pytest.skip(f"ham_export.ort_ops is not available: {e}")
    if not ort_ops.library_path().is_file():
        pytest.skip(f"ham.ai op library not built at {ort_ops.library_path()} (bash scripts/build-ort-ops.sh)")
    return ort_ops.session_options()


@pytest.mark.parametrize("kind", KINDS)
def test_custom_form_runs_with_the_op_library(exported, kind):
    options = _ort_ops_options()
    sess = session(exported(kind, "custom"), options)
    for seed, (b, c, t) in enumerate([(1, 3, 1), (3, 4, 7)]):
        if kind == "gdn":
            args = gdn_inputs(b, t, H, seed)
        elif kind == "attention":
            args = attention_inputs(b, H, c, t, seed)
        else:
            args = append_inputs(b, H, c, t, seed)
        check_against_reference(kind, sess, args)


# -------------------------------------------------------------------------------------------- standard form


@pytest.mark.parametrize("kind", KINDS)
def test_standard_form_has_only_standard_ops(exported, kind):
    model = exported(kind, "standard")
    assert [o.domain for o in model.opset_import] == [""] and not model.functions
    ops = {n.op_type for n in all_nodes(model.graph)}
    assert all(n.domain in ("", "ai.onnx") for n in all_nodes(model.graph))
    control = {"Loop", "Scan", "If"} & ops
    assert control == {"gdn": {"Scan"}, "append_evict": {"Loop"}}.get(kind, set())


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 9), t=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_standard_attention_matches_reference(standard_session, b, c, t, seed):
    check_against_reference("attention", standard_session("attention"), attention_inputs(b, H, c, t, seed))


@pytest.mark.parametrize("lengths", [[0, 0], [0, 4], [4, 4]], ids=["empty", "mixed", "full"])
@pytest.mark.parametrize("t", [1, 3])
def test_standard_attention_edge_lengths(standard_session, lengths, t):
    args = list(attention_inputs(2, H, 4, t, 7, lengths=lengths))
    check_against_reference("attention", standard_session("attention"), args)
    args[6] = torch.zeros_like(args[6])  # nothing routed: an empty cache leaves queries with no key
    check_against_reference("attention", standard_session("attention"), args)
    if lengths[0] == 0:
        assert bool((run(standard_session("attention"), args)[0][0] == 0).all())


@pytest.mark.parametrize("policy", ref.POLICIES)
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 7), t=st.integers(1, 9), seed=st.integers(0, 10_000),
       ties=st.booleans(), density=st.sampled_from([0.3, 0.7, 1.0]))
def test_standard_append_matches_reference(standard_session, policy, b, c, t, seed, ties, density):
    args = append_inputs(b, H, c, t, seed, ties=ties, density=density)
    check_against_reference(f"append_{policy}", standard_session(f"append_{policy}"), args)


@pytest.mark.parametrize("policy", ref.POLICIES)
@pytest.mark.parametrize("lengths", [[0, 2], [3, 4], [4, 4]], ids=["empty", "overflowing", "full"])
@pytest.mark.parametrize("t", [1, 6])
def test_standard_append_edge_lengths(standard_session, policy, lengths, t):
    args = append_inputs(2, H, 4, t, 3, lengths=lengths, density=1.0)
    expected_overflow = [max(0, n + t - 4) for n in lengths]
    check_against_reference(f"append_{policy}", standard_session(f"append_{policy}"), args)
    assert run(standard_session(f"append_{policy}"), args)[4].tolist() == expected_overflow


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), t=st.sampled_from([1, 2, 7, 64, 70]), seed=st.integers(0, 10_000))
def test_standard_gdn_matches_reference(standard_session, b, t, seed):
    check_against_reference("gdn", standard_session("gdn"), gdn_inputs(b, t, H, seed))


@pytest.mark.parametrize("kind", KINDS)
def test_standard_form_float16(standard_session, kind):
    sess = standard_session(kind, torch.float16)
    for seed, (b, c, t) in enumerate([(1, 3, 1), (3, 5, 8)]):
        if kind == "gdn":
            args = gdn_inputs(b, t, H, seed, torch.float16)
        elif kind == "attention":
            args = attention_inputs(b, H, c, t, seed, dtype=torch.float16)
        else:
            args = append_inputs(b, H, c, t, seed, lengths=[c] * b, dtype=torch.float16)  # full: evict works
        check_against_reference(kind, sess, args, torch.float16)


@pytest.mark.parametrize("t", [1, 3])
def test_static_t_evict_is_unrolled(t):
    """A decode-shaped append (static T, here 1 or 3) has no control flow, so that importers without Loop take it."""
    module = Append("evict").eval()
    args = append_inputs(B, H, C, t, 0)
    shapes = APPEND_SHAPES[:4] + ({0: DIM_B},) * 4
    model = onnx_ops.export_ops_model(module, args, "standard", shapes)
    assert not {"Loop", "Scan", "If"} & {n.op_type for n in all_nodes(model.graph)}
    sess = session(model)
    for seed in range(12):
        for lengths in ([4, 5], [5, 5], [2, 0]):
            check_against_reference("append_evict", sess, append_inputs(2, H, 5, t, seed, lengths=lengths,
                                                                         ties=seed % 2 == 0, density=0.8))


def test_ops_in_one_graph(tmp_path):
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
    standard = onnx_ops.export_ops_model(module, args, "standard", shapes)
    sess = session(standard)
    for seed, (b, c, t, fill) in enumerate([(1, 3, 1, 3), (3, 4, 9, 2), (2, 8, 4, 0)]):
        q, k, v, g, beta, state = gdn_inputs(b, t, H, seed)
        k_cache, v_cache, score_cache, length, *_ = append_inputs(b, H, c, t, seed, lengths=[fill] * b)
        case = (q, k, v, g, beta, state, k_cache, v_cache, score_cache, length, scale)
        with torch.no_grad():
            expected = module(*case)
        for got, e in zip(run(sess, case), expected, strict=True):
            torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5, equal_nan=True)
