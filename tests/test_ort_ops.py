"""The ONNX Runtime op library (runtimes/onnxruntime) against the reference ops, one single-node model per op.

Each model is made from the op's spec (ham_export/opspec.py): its inputs, outputs and dynamic dims (the shape
letters). Caches are NaN past their length, so a kernel that reads there shows at once. The library must be built
(bash scripts/build-ort-ops.sh); without it the module is skipped with that reason.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ham_export import ort_ops
from ham_export import reference as ref
from ham_export.opspec import CACHE_APPEND, CACHE_ATTENTION, GDN_PREFILL, ONNX_DOMAIN, ONNX_DOMAIN_VERSION, OpSpec

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402  (after the importorskip above)

if not ort_ops.library_path().is_file():
    pytest.skip(f"ONNX Runtime op library not built at {ort_ops.library_path()}; run bash scripts/build-ort-ops.sh",
                allow_module_level=True)

FLOAT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.RuntimeException)


def make_model(spec: OpSpec, dtype: str = "float32", shaped: bool = True, **attributes: str) -> bytes:
    """A one-node model of ``spec``; dims are the spec's letters (dynamic), or unknown with ``shaped=False``."""
    elem = {"T": FLOAT[dtype], "int64": TensorProto.INT64, "bool": TensorProto.BOOL}

    def info(arg):
        return helper.make_tensor_value_info(arg.name, elem[arg.dtype], arg.shape.split(",") if shaped else None)

    node = helper.make_node(spec.name, [a.name for a in spec.inputs], [a.name for a in spec.outputs],
                            domain=ONNX_DOMAIN, **attributes)
    graph = helper.make_graph([node], spec.name, [info(a) for a in spec.inputs], [info(a) for a in spec.outputs])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def options() -> ort.SessionOptions:
    opts = ort_ops.session_options()
    opts.intra_op_num_threads = 2  # exercises the kernels' ParallelFor
    opts.log_severity_level = 3
    return opts


@functools.cache
def session(op: str, dtype: str = "float32", policy: str | None = None, shaped: bool = True) -> ort.InferenceSession:
    spec = {s.name: s for s in (CACHE_ATTENTION, CACHE_APPEND, GDN_PREFILL)}[op]
    attributes = {"policy": policy} if policy else {}
    return ort.InferenceSession(make_model(spec, dtype, shaped, **attributes), options(),
                                providers=["CPUExecutionProvider"])


def run(spec: OpSpec, feeds: dict[str, np.ndarray], dtype: str = "float32", policy: str | None = None,
        shaped: bool = True) -> list[np.ndarray]:
    return session(spec.name, dtype, policy, shaped).run(None, feeds)


def reference_args(spec: OpSpec, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """The feeds in the spec's order as torch tensors, floats upcast to float32: the reference's arguments."""
    args = [torch.from_numpy(feeds[a.name].copy()) for a in spec.inputs]
    return [a.float() if a.is_floating_point() else a for a in args]


def as_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.detach()
    return x.to(torch.float16).numpy() if dtype == "float16" and x.is_floating_point() else x.numpy()


# ---------------------------------------------------------------------------------------------------------------
# inputs


def poison(cache: np.ndarray, length: np.ndarray, axis: int) -> np.ndarray:
    """NaN in every entry at and past length along ``axis`` (the cache axis), batch first."""
    cache = cache.copy()
    for b, n in enumerate(length):
        index = [b] + [slice(None)] * (cache.ndim - 1)
        index[axis] = slice(int(n), None)
        cache[tuple(index)] = np.nan
    return cache


def attention_feeds(rng, b, h, t, c, dk, dv, length, routed_p=0.6, dtype="float32"):
    f = np.dtype(dtype)
    length = np.asarray(length, dtype=np.int64)
    return {
        "q": rng.standard_normal((b, h, t, dk)).astype(f),
        "k_cache": poison(rng.standard_normal((b, h, c, dk)), length, 2).astype(f),
        "v_cache": poison(rng.standard_normal((b, h, c, dv)), length, 2).astype(f),
        "length": length,
        "k": rng.standard_normal((b, h, t, dk)).astype(f),
        "v": rng.standard_normal((b, h, t, dv)).astype(f),
        "routed": rng.random((b, t)) < routed_p,
        "scale": rng.uniform(0.3, 2.0, (h,)).astype(f),
    }


def append_feeds(rng, b, h, t, c, dk, dv, length, routed_p=0.6, dtype="float32", tie_scores=False):
    f = np.dtype(dtype)
    length = np.asarray(length, dtype=np.int64)
    scores = (lambda shape: rng.integers(0, 3, shape) / 2) if tie_scores else (lambda shape: rng.random(shape))
    return {
        "k_cache": poison(rng.standard_normal((b, h, c, dk)), length, 2).astype(f),
        "v_cache": poison(rng.standard_normal((b, h, c, dv)), length, 2).astype(f),
        "score_cache": poison(scores((b, c)), length, 1).astype(f),
        "length": length,
        "k": rng.standard_normal((b, h, t, dk)).astype(f),
        "v": rng.standard_normal((b, h, t, dv)).astype(f),
        "score": scores((b, t)).astype(f),
        "routed": rng.random((b, t)) < routed_p,
    }


def gdn_feeds(rng, b, t, h, dk, dv, dtype="float32"):
    f = np.dtype(dtype)

    def unit(shape):
        x = rng.standard_normal(shape)
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    return {
        "q": unit((b, t, h, dk)).astype(f),
        "k": unit((b, t, h, dk)).astype(f),
        "v": rng.standard_normal((b, t, h, dv)).astype(f),
        "g": (-0.7 * rng.random((b, t, h))).astype(f),
        "beta": rng.random((b, t, h)).astype(f),
        "state": rng.standard_normal((b, h, dk, dv)).astype(f),
    }


def lengths(rng, kind: str, b: int, c: int) -> list[int]:
    return {"empty": [0] * b, "full": [c] * b, "partial": [c // 2] * b,
            "mixed": list(rng.integers(0, c + 1, b))}[kind]


# ---------------------------------------------------------------------------------------------------------------
# CacheAttention


def check_attention(feeds, dtype="float32"):
    (got,) = run(CACHE_ATTENTION, feeds, dtype)
    expected = ref.cache_attention(*reference_args(CACHE_ATTENTION, feeds))
    tol = 1e-5 if dtype == "float32" else 2e-3
    assert got.dtype == np.dtype(dtype) and got.shape == tuple(expected.shape)
    assert np.isfinite(got).all()
    torch.testing.assert_close(torch.from_numpy(got).float(), expected, atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize("kind", ["empty", "partial", "full", "mixed"])
@pytest.mark.parametrize(("b", "h", "t", "c"), [(1, 1, 1, 4), (2, 3, 1, 8), (3, 2, 5, 6), (2, 4, 9, 16)])
def test_cache_attention_matches_reference(b, h, t, c, kind):
    rng = np.random.default_rng(b * 100 + t * 10 + c)
    check_attention(attention_feeds(rng, b, h, t, c, 8, 6, lengths(rng, kind, b, c)))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 6), c=st.integers(0, 7), dk=st.integers(1, 9),
       dv=st.integers(1, 9), routed_p=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_cache_attention_hypothesis(b, h, t, c, dk, dv, routed_p, seed):
    rng = np.random.default_rng(seed)
    check_attention(attention_feeds(rng, b, h, t, c, dk, dv, rng.integers(0, c + 1, b), routed_p))


def test_cache_attention_query_without_keys_is_zero():
    rng = np.random.default_rng(0)
    feeds = attention_feeds(rng, 2, 2, 3, 4, 8, 5, [0, 2], routed_p=0.0)
    got = check_attention(feeds)
    assert (got[0] == 0).all() and not (got[1] == 0).all()


def test_cache_attention_large_logits_are_stable():
    rng = np.random.default_rng(1)
    feeds = attention_feeds(rng, 1, 2, 4, 8, 16, 4, [5])
    feeds["q"] *= 40.0  # logits in the thousands: exp overflows without the max subtraction
    check_attention(feeds)


def test_cache_attention_float16():
    rng = np.random.default_rng(2)
    check_attention(attention_feeds(rng, 2, 3, 4, 8, 8, 6, [0, 5], dtype="float16"), "float16")


# ---------------------------------------------------------------------------------------------------------------
# CacheAppend


def check_append(feeds, policy, dtype="float32"):
    got = run(CACHE_APPEND, feeds, dtype, policy)
    expected = ref.cache_append(*reference_args(CACHE_APPEND, feeds), policy)
    assert len(got) == len(CACHE_APPEND.outputs)
    for arg, g, e in zip(CACHE_APPEND.outputs, got, expected, strict=True):
        # Copies and a discrete policy: exact, NaN past the new length included.
        np.testing.assert_array_equal(g, as_numpy(e, dtype), err_msg=arg.name)
    return got


@pytest.mark.parametrize("policy", ["drop", "evict"])
@pytest.mark.parametrize("kind", ["empty", "partial", "full", "mixed"])
@pytest.mark.parametrize(("b", "h", "t", "c"), [(1, 1, 1, 4), (2, 3, 1, 8), (3, 2, 5, 6), (2, 2, 9, 4)])
def test_cache_append_matches_reference(b, h, t, c, kind, policy):
    rng = np.random.default_rng(b * 100 + t * 10 + c)
    check_append(append_feeds(rng, b, h, t, c, 8, 6, lengths(rng, kind, b, c)), policy)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 7), c=st.integers(1, 5), dk=st.integers(1, 5),
       dv=st.integers(1, 5), routed_p=st.sampled_from([0.3, 0.8, 1.0]), ties=st.booleans(),
       policy=st.sampled_from(["drop", "evict"]), seed=st.integers(0, 2**16))
def test_cache_append_hypothesis(b, h, t, c, dk, dv, routed_p, ties, policy, seed):
    rng = np.random.default_rng(seed)
    feeds = append_feeds(rng, b, h, t, c, dk, dv, rng.integers(0, c + 1, b), routed_p, tie_scores=ties)
    check_append(feeds, policy)


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_cache_append_overflow(policy):
    rng = np.random.default_rng(3)
    feeds = append_feeds(rng, 2, 2, 6, 4, 3, 3, [3, 4], routed_p=1.0)
    feeds["score"][:] = [[0.1, 0.9, 0.2, 0.95, 0.3, 0.8], [0.0, 2.0, 2.0, 0.5, 3.0, 0.1]]
    _, _, score_cache, length, overflow = check_append(feeds, policy)
    assert length.tolist() == [4, 4] and overflow.tolist() == [5, 6]
    if policy == "evict":  # the high scorers got in
        assert 0.9 in score_cache[0] and 3.0 in score_cache[1]


def test_cache_append_evict_ties_take_first_lowest_slot_and_need_a_strictly_higher_score():
    rng = np.random.default_rng(4)
    feeds = append_feeds(rng, 1, 1, 2, 3, 2, 2, [3], routed_p=1.0)
    feeds["score_cache"][:] = [[0.5, 0.2, 0.2]]
    feeds["score"][:] = [[0.2, 0.3]]  # the first ties the lowest (stays out), the second evicts slot 1
    k_cache, _, score_cache, _, overflow = check_append(feeds, "evict")
    assert score_cache.tolist() == [[0.5, np.float32(0.3), np.float32(0.2)]] and overflow.tolist() == [2]
    np.testing.assert_array_equal(k_cache[0, 0, 1], feeds["k"][0, 0, 1])


def test_cache_append_float16():
    rng = np.random.default_rng(5)
    for policy in ("drop", "evict"):
        check_append(append_feeds(rng, 2, 2, 5, 4, 4, 4, [2, 4], routed_p=0.9, dtype="float16"), policy, "float16")


def test_cache_append_zero_capacity_counts_every_routed_token_as_overflow():
    rng = np.random.default_rng(6)
    feeds = append_feeds(rng, 2, 1, 3, 0, 2, 2, [0, 0], routed_p=1.0)
    check_append(feeds, "drop")
    # evict has nothing to evict (the reference's argmin fails on an empty cache); the tokens count as overflow.
    *_, length, overflow = run(CACHE_APPEND, feeds, policy="evict")
    assert length.tolist() == [0, 0] and overflow.tolist() == [3, 3]


# ---------------------------------------------------------------------------------------------------------------
# GdnPrefill


def check_gdn(feeds, dtype="float32"):
    got = run(GDN_PREFILL, feeds, dtype)
    args = reference_args(GDN_PREFILL, feeds)
    recurrent = ref.gdn_recurrent(*args)
    chunked = ref.gdn_chunked(*args)
    tol = 2e-5 if dtype == "float32" else 3e-3
    for arg, g, r, c in zip(GDN_PREFILL.outputs, got, recurrent, chunked, strict=True):
        assert g.dtype == np.dtype(dtype) and g.shape == tuple(r.shape), arg.name
        torch.testing.assert_close(torch.from_numpy(g).float(), r, atol=tol, rtol=tol, msg=arg.name)
        torch.testing.assert_close(torch.from_numpy(g).float(), c, atol=max(tol, 1e-4), rtol=1e-4, msg=arg.name)


@pytest.mark.parametrize(("b", "t", "h", "dk", "dv"), [(1, 1, 1, 4, 4), (2, 1, 3, 8, 6), (2, 7, 2, 8, 8),
                                                       (3, 33, 2, 16, 8), (1, 70, 1, 5, 3)])
def test_gdn_prefill_matches_reference(b, t, h, dk, dv):
    check_gdn(gdn_feeds(np.random.default_rng(t), b, t, h, dk, dv))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 20), h=st.integers(1, 3), dk=st.integers(1, 9), dv=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_gdn_prefill_hypothesis(b, t, h, dk, dv, seed):
    check_gdn(gdn_feeds(np.random.default_rng(seed), b, t, h, dk, dv))


def test_gdn_prefill_continues_from_its_state():
    feeds = gdn_feeds(np.random.default_rng(7), 2, 12, 2, 8, 8)
    whole = run(GDN_PREFILL, feeds)
    first = run(GDN_PREFILL, {**{n: x[:, :5] for n, x in feeds.items() if n != "state"}, "state": feeds["state"]})
    second = run(GDN_PREFILL, {**{n: x[:, 5:] for n, x in feeds.items() if n != "state"}, "state": first[2]})
    np.testing.assert_allclose(np.concatenate([first[0], second[0]], 1), whole[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(second[2], whole[2], atol=1e-5, rtol=1e-5)


def test_gdn_prefill_no_tokens_keeps_the_state():
    feeds = gdn_feeds(np.random.default_rng(8), 2, 0, 2, 4, 3)
    o, vhat, state = run(GDN_PREFILL, feeds)
    assert o.shape == vhat.shape == (2, 0, 2, 3)
    np.testing.assert_array_equal(state, feeds["state"])


def test_gdn_prefill_float16():
    check_gdn(gdn_feeds(np.random.default_rng(9), 2, 9, 2, 8, 8, dtype="float16"), "float16")


# ---------------------------------------------------------------------------------------------------------------
# Shared cache buffers (decode): CacheAppend writes only the new entries when input and output are one buffer


CACHES = (("k_cache", "k_cache_out"), ("v_cache", "v_cache_out"), ("score_cache", "score_cache_out"))


def cache_nbytes(feeds) -> int:
    return sum(feeds[name].nbytes for name, _ in CACHES)


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_shared_buffers_are_written_in_place_without_a_copy(policy):
    rng = np.random.default_rng(10)
    feeds = append_feeds(rng, 2, 3, 1, 16, 8, 8, [5, 16], routed_p=1.0)
    expected = [as_numpy(e, "float32") for e in ref.cache_append(*reference_args(CACHE_APPEND, feeds), policy)]
    sess = session("CacheAppend", "float32", policy)
    binding = sess.io_binding()
    arrays = {name: feeds[name].copy() for name in feeds}  # the caller's buffers, NaN past length
    values = {name: ort.OrtValue.ortvalue_from_numpy(arrays[name]) for name in arrays}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name, out in (*CACHES, ("length", "length_out")):
        binding.bind_ortvalue_output(out, values[name])
    binding.bind_output("overflow", "cpu")

    ort_ops.reset_cache_copy_stats()
    sess.run_with_iobinding(binding)
    assert ort_ops.cache_copy_stats() == (0, 0)  # the kernel saw output == input and copied nothing

    shared = (*CACHES, ("length", "length_out"))
    outputs = binding.get_outputs()
    for (name, out), value in zip(shared, outputs, strict=False):
        # ONNX Runtime handed the kernel the caller's buffer: the numpy array itself now holds the result.
        assert value.data_ptr() == arrays[name].ctypes.data, out
    for (name, out), e in zip(shared, expected, strict=False):
        np.testing.assert_array_equal(arrays[name], e, err_msg=out)  # NaN past the new length preserved
    np.testing.assert_array_equal(outputs[-1].numpy(), expected[-1], err_msg="overflow")
    assert np.isnan(arrays["k_cache"][0, :, 6:]).all()


def test_separate_buffers_copy_the_cache_and_leave_the_inputs_alone():
    rng = np.random.default_rng(11)
    feeds = append_feeds(rng, 2, 3, 1, 16, 8, 8, [5, 16], routed_p=1.0)
    expected = [as_numpy(e, "float32") for e in ref.cache_append(*reference_args(CACHE_APPEND, feeds), "drop")]
    sess = session("CacheAppend", "float32", "drop")
    inputs = {name: feeds[name].copy() for name in feeds}
    outputs = {arg.name: np.full_like(e, 7) for arg, e in zip(CACHE_APPEND.outputs, expected, strict=True)}
    binding = sess.io_binding()
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for name, array in outputs.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))

    ort_ops.reset_cache_copy_stats()
    sess.run_with_iobinding(binding)
    assert ort_ops.cache_copy_stats() == (3, cache_nbytes(feeds))  # proves the counters see this library's copies
    for arg, e in zip(CACHE_APPEND.outputs, expected, strict=True):
        np.testing.assert_array_equal(outputs[arg.name], e, err_msg=arg.name)  # written into the bound arrays
    for name, array in inputs.items():
        np.testing.assert_array_equal(array, feeds[name], err_msg=name)

    ort_ops.reset_cache_copy_stats()
    sess.run(None, feeds)  # a plain run: ONNX Runtime allocates the outputs, the kernel copies
    assert ort_ops.cache_copy_stats() == (3, cache_nbytes(feeds))


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_decode_loop_with_shared_buffers_matches_reference_step_by_step(policy):
    """Decode as ham_export.runners.OrtRunner does it: bind_cpu_input, and bind_output at the same address."""
    rng = np.random.default_rng(12)
    b, h, c, dk, dv, steps = 2, 2, 5, 4, 4, 14
    state = append_feeds(rng, b, h, 1, c, dk, dv, [0, 3])
    caches = {name: state[name].copy() for name in ("k_cache", "v_cache", "score_cache", "length")}
    addresses = {name: array.ctypes.data for name, array in caches.items()}
    sess = session("CacheAppend", "float32", policy)
    ort_ops.reset_cache_copy_stats()
    for step in range(steps):
        new = append_feeds(rng, b, h, 1, c, dk, dv, [0] * b, routed_p=0.7)
        feeds = {**caches, **{n: new[n] for n in ("k", "v", "score", "routed")}}
        expected = ref.cache_append(*reference_args(CACHE_APPEND, feeds), policy)
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, out in (*CACHES, ("length", "length_out")):
            binding.bind_output(out, "cpu", 0, caches[name].dtype, list(caches[name].shape), caches[name].ctypes.data)
        binding.bind_output("overflow", "cpu")
        sess.run_with_iobinding(binding)
        for name, e in zip(("k_cache", "v_cache", "score_cache", "length"), expected, strict=False):
            np.testing.assert_array_equal(caches[name], e.numpy(), err_msg=f"{name} at step {step}")
        np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[-1], expected[4].numpy())
    assert {name: array.ctypes.data for name, array in caches.items()} == addresses
    assert caches["length"].tolist() == [c, c]  # it filled up and overflowed
    assert ort_ops.cache_copy_stats() == (0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_model_fails_clearly_without_the_library():
    plain = ort.SessionOptions()
    plain.log_severity_level = 4
    with pytest.raises(ORT_ERRORS, match=r"ham\.ai:CacheAttention\(\S+\) is not a registered function/op"):
        ort.InferenceSession(make_model(CACHE_ATTENTION), plain, providers=["CPUExecutionProvider"])


def test_missing_library_names_the_path_and_the_build_command(tmp_path, monkeypatch):
    missing = tmp_path / "libham_ort_ops.so"
    build = re.escape("; build it with bash scripts/build-ort-ops.sh")
    with pytest.raises(ort_ops.OrtOpsLibraryError, match=f"not found at {re.escape(str(missing))}{build}"):
        ort_ops.session_options(library=missing)
    monkeypatch.setenv(ort_ops.ENV_VAR, str(missing))
    assert ort_ops.library_path() == missing
    with pytest.raises(ort_ops.OrtOpsLibraryError, match=f"{re.escape(str(missing))} \\(from \\$HAM_ORT_OPS_LIB\\)"):
        ort_ops.session_options()


def test_unloadable_library_is_a_ham_error(tmp_path):
    bogus = tmp_path / "libham_ort_ops.so"
    bogus.write_text("not a library")
    with pytest.raises(ort_ops.OrtOpsLibraryError, match="cannot load"):
        ort_ops.session_options(library=bogus)


BAD_SHAPES = [
    (CACHE_ATTENTION, "k_cache", (2, 3, 6, 5), r"CacheAttention: input 'k_cache' has shape \[2, 3, 6, 5\], "
                                               r"expected \[B, H, C, K\] with K = 4 \(from input 'q'\)"),
    (CACHE_ATTENTION, "scale", (4,), r"input 'scale' has shape \[4\], expected \[H\] with H = 3"),
    (CACHE_ATTENTION, "routed", (2, 1, 1), r"input 'routed' has shape \[2, 1, 1\] \(rank 3\), expected rank 2"),
    (CACHE_APPEND, "v", (2, 3, 1, 4, 1), r"CacheAppend: input 'v' has shape .*expected rank 4: \[B, H, T, V\]"),
    (CACHE_APPEND, "score_cache", (2, 5), r"input 'score_cache' .*expected \[B, C\] with C = 6"),
    (GDN_PREFILL, "state", (2, 3, 4, 5), r"GdnPrefill: input 'state' .*expected \[B, H, K, V\] with V = 4"),
]


@pytest.mark.parametrize(("spec", "name", "shape", "message"), BAD_SHAPES,
                         ids=[f"{s.name}-{n}" for s, n, *_ in BAD_SHAPES])
def test_bad_shape_is_an_error_naming_the_input(spec, name, shape, message):
    rng = np.random.default_rng(13)
    feeds = {CACHE_ATTENTION.name: lambda: attention_feeds(rng, 2, 3, 1, 6, 4, 4, [2, 6]),
             CACHE_APPEND.name: lambda: append_feeds(rng, 2, 3, 1, 6, 4, 4, [2, 6]),
             GDN_PREFILL.name: lambda: gdn_feeds(rng, 2, 1, 3, 4, 4)}[spec.name]()
    good = feeds[name]
    feeds[name] = rng.standard_normal(shape).astype(good.dtype)
    policy = "drop" if spec is CACHE_APPEND else None
    with pytest.raises(ORT_ERRORS, match=message):
        run(spec, feeds, policy=policy, shaped=False)
    run(spec, {**feeds, name: good}, policy=policy, shaped=False)  # the session still works


@pytest.mark.parametrize(("spec", "bad"), [(CACHE_ATTENTION, [2, 7]), (CACHE_APPEND, [-1, 0])])
def test_length_out_of_range_is_an_error(spec, bad):
    rng = np.random.default_rng(14)
    make = attention_feeds if spec is CACHE_ATTENTION else append_feeds
    feeds = make(rng, 2, 1, 1, 6, 4, 4, [0, 0])
    feeds["length"] = np.array(bad, dtype=np.int64)
    policy = "drop" if spec is CACHE_APPEND else None
    with pytest.raises(ORT_ERRORS, match=r"input 'length' holds -?\d+ at batch \d, outside \[0, C\] .*C = 6"):
        run(spec, feeds, policy=policy)
    feeds["length"] = np.array([0, 6], dtype=np.int64)
    run(spec, feeds, policy=policy)  # the session still works


@pytest.mark.parametrize("policy", [None, "keep"])
def test_bad_policy_fails_at_session_creation(policy):
    attributes = {"policy": policy} if policy else {}
    with pytest.raises(ORT_ERRORS, match="CacheAppend: attribute 'policy' is" + (" missing" if policy is None else "")):
        ort.InferenceSession(make_model(CACHE_APPEND, **attributes), options(), providers=["CPUExecutionProvider"])


def decode_layer_model(policy: str, append_first: bool) -> bytes:
    """CacheAttention and CacheAppend on the same cache, as in a decode layer: neither depends on the other."""
    elem = {"T": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}

    def info(arg):
        return helper.make_tensor_value_info(arg.name, elem[arg.dtype], arg.shape.split(","))

    attend = helper.make_node(CACHE_ATTENTION.name, [a.name for a in CACHE_ATTENTION.inputs],
                              [a.name for a in CACHE_ATTENTION.outputs], domain=ONNX_DOMAIN)
    append = helper.make_node(CACHE_APPEND.name, [a.name for a in CACHE_APPEND.inputs],
                              [a.name for a in CACHE_APPEND.outputs], domain=ONNX_DOMAIN, policy=policy)
    inputs = {a.name: a for a in (*CACHE_ATTENTION.inputs, *CACHE_APPEND.inputs)}
    graph = helper.make_graph([append, attend] if append_first else [attend, append], "decode_layer",
                              [info(a) for a in inputs.values()],
                              [info(a) for a in (*CACHE_ATTENTION.outputs, *CACHE_APPEND.outputs)])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


@pytest.mark.parametrize("execution_order", ["DEFAULT", "PRIORITY_BASED"])
@pytest.mark.parametrize("append_first", [False, True])
def test_shared_caches_are_safe_in_any_node_order_with_drop_and_an_unshared_length(append_first, execution_order):
    """ONNX Runtime orders independent nodes differently under its execution orders (see the README): with drop and
    length bound apart, an append writes only at [length, ...), which the attention never reads, so the order
    does not matter. (Sharing length, or evict at overflow, does depend on it.)"""
    rng = np.random.default_rng(15)
    b, h, c, dk, dv = 2, 2, 4, 4, 4
    attention = attention_feeds(rng, b, h, 1, c, dk, dv, [4, 2], routed_p=1.0)
    feeds = {**append_feeds(rng, b, h, 1, c, dk, dv, [4, 2], routed_p=1.0),
             **{name: attention[name] for name in ("q", "k_cache", "v_cache", "scale")}}
    expected_o = ref.cache_attention(*reference_args(CACHE_ATTENTION, feeds)).numpy()
    expected = [e.numpy() for e in ref.cache_append(*reference_args(CACHE_APPEND, feeds), "drop")]
    opts = options()
    opts.execution_order = getattr(ort.ExecutionOrder, execution_order)
    sess = ort.InferenceSession(decode_layer_model("drop", append_first), opts, providers=["CPUExecutionProvider"])
    arrays = {name: array.copy() for name, array in feeds.items()}
    binding = sess.io_binding()
    for name, array in arrays.items():
        binding.bind_cpu_input(name, array)
    for name, out in CACHES:
        binding.bind_output(out, "cpu", 0, arrays[name].dtype, list(arrays[name].shape), arrays[name].ctypes.data)
    rest = ("o", "length_out", "overflow")
    for out in rest:
        binding.bind_output(out, "cpu")
    ort_ops.reset_cache_copy_stats()
    sess.run_with_iobinding(binding)
    assert ort_ops.cache_copy_stats() == (0, 0)
    o, length, overflow = binding.copy_outputs_to_cpu()[len(CACHES):]
    np.testing.assert_allclose(o, expected_o, atol=1e-5, rtol=1e-5)
    for (name, _), e in zip(CACHES, expected, strict=False):
        np.testing.assert_array_equal(arrays[name], e, err_msg=name)
    np.testing.assert_array_equal(length, expected[3])
    np.testing.assert_array_equal(overflow, expected[4])


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels (a GPU, onnxruntime-gpu and a library built with -DHAM_ORT_CUDA=ON)


def cuda_session(spec: OpSpec, dtype: str, policy: str | None = None) -> ort.InferenceSession:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime (needs onnxruntime-gpu and a GPU)")
    if not ort_ops.has_cuda_kernels():
        pytest.skip("the op library was built without CUDA kernels (bash scripts/build-ort-ops.sh -DHAM_ORT_CUDA=ON)")
    opts = options()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # the CUDA kernels or an error
    attributes = {"policy": policy} if policy else {}
    return ort.InferenceSession(make_model(spec, dtype, **attributes), opts, providers=["CUDAExecutionProvider"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_kernels_match_reference(dtype):
    rng = np.random.default_rng(16)
    tol = 2e-5 if dtype == "float32" else 3e-3
    feeds = attention_feeds(rng, 2, 3, 5, 300, 16, 8, [0, 211], dtype=dtype)  # more keys than one chunk
    (o,) = cuda_session(CACHE_ATTENTION, dtype).run(None, feeds)
    expected = ref.cache_attention(*reference_args(CACHE_ATTENTION, feeds))
    torch.testing.assert_close(torch.from_numpy(o).float(), expected, atol=tol, rtol=tol)
    for policy in ("drop", "evict"):
        feeds = append_feeds(rng, 3, 2, 7, 5, 4, 4, [0, 3, 5], routed_p=0.9, dtype=dtype, tie_scores=True)
        got = cuda_session(CACHE_APPEND, dtype, policy).run(None, feeds)
        expected = ref.cache_append(*reference_args(CACHE_APPEND, feeds), policy)
        for arg, g, e in zip(CACHE_APPEND.outputs, got, expected, strict=True):
            np.testing.assert_array_equal(g, as_numpy(e, dtype), err_msg=f"{arg.name} ({policy})")
    feeds = gdn_feeds(rng, 2, 19, 3, 16, 40, dtype=dtype)
    got = cuda_session(GDN_PREFILL, dtype).run(None, feeds)
    for arg, g, e in zip(GDN_PREFILL.outputs, got, ref.gdn_recurrent(*reference_args(GDN_PREFILL, feeds)), strict=True):
        torch.testing.assert_close(torch.from_numpy(g).float(), e, atol=tol, rtol=tol, msg=arg.name)
