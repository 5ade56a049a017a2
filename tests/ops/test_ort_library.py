"""The ONNX Runtime op library (``runtimes/onnxruntime``) beyond what every implementation shares (the op suites in
this folder run it as ``ort`` and ``ort-in-place``): decode with shared cache buffers copies nothing (the library's
copy counters), any node order is safe with drop and an unshared length, clear errors for a missing or broken
library, and the CUDA kernels where a GPU and onnxruntime-gpu exist.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ham_export.ops import libraries
from ham_export.ops import reference as ref
from ham_export.ops.libraries import ORT
from ham_export.ops.spec import CACHE_APPEND, CACHE_ATTENTION, GDN_PREFILL, ONNX_DOMAIN, ONNX_DOMAIN_VERSION, OpSpec

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402  (after the importorskip above)

if not ORT.path().is_file():
    pytest.skip(f"ONNX Runtime op library not built at {ORT.path()}; run {ORT.build}", allow_module_level=True)

FLOAT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.RuntimeException)


def make_model(spec: OpSpec, dtype: str = "float32", **attributes: str) -> bytes:
    """A one-node model of ``spec``, dims named by the spec's letters."""
    elem = {"T": FLOAT[dtype], "int64": TensorProto.INT64, "bool": TensorProto.BOOL}

    def info(arg):
        return helper.make_tensor_value_info(arg.name, elem[arg.dtype], list(arg.shape))

    node = helper.make_node(spec.name, list(spec.input_names), [a.name for a in spec.outputs], domain=ONNX_DOMAIN,
                            **attributes)
    graph = helper.make_graph([node], spec.name, [info(a) for a in spec.inputs], [info(a) for a in spec.outputs])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def options() -> ort.SessionOptions:
    opts = libraries.ort_session_options()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return opts


def session(op: str, dtype: str = "float32", policy: str | None = None) -> ort.InferenceSession:
    spec = {s.name: s for s in (CACHE_ATTENTION, CACHE_APPEND, GDN_PREFILL)}[op]
    attributes = {"policy": policy} if policy else {}
    return ort.InferenceSession(make_model(spec, dtype, **attributes), options(), providers=["CPUExecutionProvider"])


def reference_args(spec: OpSpec, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    args = [torch.from_numpy(feeds[a.name].copy()) for a in spec.inputs]
    return [a.float() if a.is_floating_point() else a for a in args]


def as_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.detach()
    return x.to(torch.float16).numpy() if dtype == "float16" and x.is_floating_point() else x.numpy()


def feeds_of(inputs: list[torch.Tensor], spec: OpSpec) -> dict[str, np.ndarray]:
    return {name: x.numpy() for name, x in zip(spec.input_names, inputs, strict=True)}


def append_feeds(b, h, t, c, k, v, lengths, routed_p=0.6, seed=0) -> dict[str, np.ndarray]:
    from .inputs import append

    return feeds_of(append(b, h, t, c, k, v, lengths=lengths, routed_p=routed_p, seed=seed), CACHE_APPEND)


def attention_feeds(b, h, t, c, k, v, lengths, routed_p=0.6, seed=0) -> dict[str, np.ndarray]:
    from .inputs import attention

    return feeds_of(attention(b, h, t, c, k, v, lengths=lengths, routed_p=routed_p, seed=seed), CACHE_ATTENTION)


# ---------------------------------------------------------------------------------------------------------------
# Shared cache buffers (decode): CacheAppend writes only the new entries when input and output are one buffer


CACHES = (("k_cache", "k_cache_out"), ("v_cache", "v_cache_out"), ("score_cache", "score_cache_out"))


def cache_nbytes(feeds) -> int:
    return sum(feeds[name].nbytes for name, _ in CACHES)


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_shared_buffers_are_written_in_place_without_a_copy(policy):
    feeds = append_feeds(2, 3, 1, 16, 8, 8, [5, 16], routed_p=1.0, seed=10)
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

    libraries.reset_cache_copy_stats()
    sess.run_with_iobinding(binding)
    assert libraries.cache_copy_stats() == (0, 0)  # the kernel saw output == input and copied nothing

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
    feeds = append_feeds(2, 3, 1, 16, 8, 8, [5, 16], routed_p=1.0, seed=11)
    expected = [as_numpy(e, "float32") for e in ref.cache_append(*reference_args(CACHE_APPEND, feeds), "drop")]
    sess = session("CacheAppend", "float32", "drop")
    inputs = {name: feeds[name].copy() for name in feeds}
    outputs = {arg.name: np.full_like(e, 7) for arg, e in zip(CACHE_APPEND.outputs, expected, strict=True)}
    binding = sess.io_binding()
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for name, array in outputs.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))

    libraries.reset_cache_copy_stats()
    sess.run_with_iobinding(binding)
    assert libraries.cache_copy_stats() == (3, cache_nbytes(feeds))  # proves the counters see this library's copies
    for arg, e in zip(CACHE_APPEND.outputs, expected, strict=True):
        np.testing.assert_array_equal(outputs[arg.name], e, err_msg=arg.name)  # written into the bound arrays
    for name, array in inputs.items():
        np.testing.assert_array_equal(array, feeds[name], err_msg=name)

    libraries.reset_cache_copy_stats()
    sess.run(None, feeds)  # a plain run: ONNX Runtime allocates the outputs, the kernel copies
    assert libraries.cache_copy_stats() == (3, cache_nbytes(feeds))


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_decode_loop_with_shared_buffers_matches_reference_step_by_step(policy):
    """Decode as ham_export.backends.onnxruntime.OrtRunner does it: bind_cpu_input, and bind_output at the same
    address."""
    b, h, c, dk, dv, steps = 2, 2, 5, 4, 4, 14
    state = append_feeds(b, h, 1, c, dk, dv, [0, 3], seed=12)
    caches = {name: state[name].copy() for name in ("k_cache", "v_cache", "score_cache", "length")}
    addresses = {name: array.ctypes.data for name, array in caches.items()}
    sess = session("CacheAppend", "float32", policy)
    libraries.reset_cache_copy_stats()
    for step in range(steps):
        new = append_feeds(b, h, 1, c, dk, dv, [0] * b, routed_p=0.7, seed=100 + step)
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
    assert libraries.cache_copy_stats() == (0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_model_fails_clearly_without_the_library():
    plain = ort.SessionOptions()
    plain.log_severity_level = 4
    with pytest.raises(ORT_ERRORS, match=r"ham\.ai:CacheAttention\(\S+\) is not a registered function/op"):
        ort.InferenceSession(make_model(CACHE_ATTENTION), plain, providers=["CPUExecutionProvider"])


def test_missing_library_names_the_path_and_the_build_command(tmp_path, monkeypatch):
    missing = tmp_path / "libham_ort_ops.so"
    build = re.escape("; build it with bash scripts/build-ort-ops.sh (or name it with $HAM_ORT_OPS_LIB)")
    with pytest.raises(libraries.OpLibraryError, match=f"not found at {re.escape(str(missing))}{build}"):
        libraries.ort_session_options(library=missing)
    monkeypatch.setenv(ORT.env, str(missing))
    assert ORT.path() == missing
    with pytest.raises(libraries.OpLibraryError, match=f"{re.escape(str(missing))} \\(from \\$HAM_ORT_OPS_LIB\\)"):
        libraries.ort_session_options()


def test_the_library_is_found_next_to_the_package(monkeypatch):
    monkeypatch.delenv(ORT.env, raising=False)
    assert ORT.path() == libraries.PACKAGE_LIB / "libham_ort_ops.so"
    assert ORT.path().parent.parent.name == "ham_export"  # ham_export/lib/: where the build script puts it


def test_unloadable_library_is_a_ham_error(tmp_path):
    bogus = tmp_path / "libham_ort_ops.so"
    bogus.write_text("not a library")
    with pytest.raises(libraries.OpLibraryError, match="cannot load"):
        libraries.ort_session_options(library=bogus)


def decode_layer_model(policy: str, append_first: bool) -> bytes:
    """CacheAttention and CacheAppend on the same cache, as in a decode layer: neither depends on the other."""
    elem = {"T": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}

    def info(arg):
        return helper.make_tensor_value_info(arg.name, elem[arg.dtype], list(arg.shape))

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
    b, h, c, dk, dv = 2, 2, 4, 4, 4
    attention = attention_feeds(b, h, 1, c, dk, dv, [4, 2], routed_p=1.0, seed=15)
    feeds = {**append_feeds(b, h, 1, c, dk, dv, [4, 2], routed_p=1.0, seed=16),
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
    libraries.reset_cache_copy_stats()
    sess.run_with_iobinding(binding)
    assert libraries.cache_copy_stats() == (0, 0)
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
    if not libraries.ort_has_cuda_kernels():
        pytest.skip("the op library was built without CUDA kernels (bash scripts/build-ort-ops.sh -DHAM_ORT_CUDA=ON)")
    opts = options()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # the CUDA kernels or an error
    attributes = {"policy": policy} if policy else {}
    return ort.InferenceSession(make_model(spec, dtype, **attributes), opts, providers=["CUDAExecutionProvider"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_kernels_match_reference(dtype):
    from .inputs import append, attention, gdn

    torch_dtype = getattr(torch, dtype)
    tol = 2e-5 if dtype == "float32" else 3e-3
    # more keys than one chunk; a refused row (length past C) is NaN, the others are computed
    inputs = attention(3, 3, 5, 300, 16, 8, lengths=[0, 211, 300], dtype=torch_dtype, seed=16)
    feeds = feeds_of(inputs, CACHE_ATTENTION)
    (o,) = cuda_session(CACHE_ATTENTION, dtype).run(None, feeds)
    expected = ref.cache_attention(*reference_args(CACHE_ATTENTION, feeds))
    torch.testing.assert_close(torch.from_numpy(o).float(), expected, atol=tol, rtol=tol)
    feeds["length"] = np.array([0, 211, 301], dtype=np.int64)
    (o,) = cuda_session(CACHE_ATTENTION, dtype).run(None, feeds)
    assert np.isnan(o[2]).all() and np.isfinite(o[:2]).all()
    for policy in ("drop", "evict"):
        inputs = append(3, 2, 7, 5, 4, 4, lengths=[0, 3, 5], routed_p=0.9, dtype=torch_dtype, seed=17, ties=True)
        feeds = feeds_of(inputs, CACHE_APPEND)
        got = cuda_session(CACHE_APPEND, dtype, policy).run(None, feeds)
        expected = ref.cache_append(*reference_args(CACHE_APPEND, feeds), policy)
        for arg, g, e in zip(CACHE_APPEND.outputs, got, expected, strict=True):
            np.testing.assert_array_equal(g, as_numpy(e, dtype), err_msg=f"{arg.name} ({policy})")
        feeds["length"] = np.array([0, -1, 6], dtype=np.int64)  # refused rows: left alone, overflow -1
        *caches, length, overflow = cuda_session(CACHE_APPEND, dtype, policy).run(None, feeds)
        assert overflow.tolist()[1:] == [-1, -1] and length.tolist()[1:] == [-1, 6]
        np.testing.assert_array_equal(caches[0][1:], feeds["k_cache"][1:])
    feeds = feeds_of(gdn(2, 19, 3, 16, 40, dtype=torch_dtype, seed=18), GDN_PREFILL)
    got = cuda_session(GDN_PREFILL, dtype).run(None, feeds)
    for arg, g, e in zip(GDN_PREFILL.outputs, got, ref.gdn_recurrent(*reference_args(GDN_PREFILL, feeds)), strict=True):
        torch.testing.assert_close(torch.from_numpy(g).float(), e, atol=tol, rtol=tol, msg=arg.name)
