"""Inputs outside an op's preconditions (:mod:`ham_export.ops.spec`): every implementation refuses them before it
writes anything, with the spec's own message where the check is the project's (the Python check of the spec, and the
C++ check of the generated header ``runtimes/common/ham_op_spec.h``: one text in both languages).

Where the runtime checks before the project's code runs, its own message is accepted: ONNX Runtime checks the
dtypes of a node's inputs against the op's schema, and a compiled TIR function checks every dtype and shape of its
arguments. The standard-op ONNX graphs have no assertion op: ONNX Runtime checks its inputs' types and ranks, but the
sizes the spec ties together across inputs (B, T, C) it cannot, so they are left out of the shape cases.

Lengths outside [0, C] are refused on the host (an error), or in the kernel by the implementations that cannot read
them on the host (``test_cache_append_fuzz.py`` and ``test_lengths_outside_the_cache_are_refused`` below).
"""

from __future__ import annotations

import pytest
import torch

from .conftest import available
from .implementations import IMPLEMENTATIONS, SPECS, ImplError
from .inputs import append, attention, gdn

OWN_MESSAGES = {"ort": "dtype", "ort-in-place": "dtype", "tir": "all", "tir-in-place": "all"}
"""Implementations whose runtime checks some kinds of change first, with its own message: {name: "dtype" | "all"}."""
NO_SHAPE_CHECKS = {"onnx-standard", "onnx-standard-decode", "onnx-portable"}
INT32_MASKS = {"trt-launch", "trt-launch-in-place"}
"""The TensorRT plugin form, whose bool inputs are int32 (a plugin takes no bool I/O): the spec's own message, with
int32 where it says bool."""


def _with(inputs, index, value):
    inputs = list(inputs)
    inputs[index] = value
    return inputs


def _bad_cases():
    """(op, id, kind, inputs, attributes, expected message as a regex)."""
    a = attention(2, 3, 1, 6, k=4, v=4, lengths=[2, 6])
    c = append(2, 3, 1, 6, k=4, v=4, lengths=[2, 6])
    g = gdn(2, 3, 2, 4, 4)
    drop = {"policy": "drop"}
    return [
        ("cache_attention", "k_cache-width", "shape", _with(a, 1, torch.randn(2, 3, 6, 5)), {},
         r"input 'k_cache' has shape \[2, 3, 6, 5\], expected \[B, H, C, K\] with K = 4 \(from input 'q'\)"),
        ("cache_attention", "scale-heads", "shape", _with(a, 7, torch.ones(4)), {},
         r"input 'scale' has shape \[4\], expected \[H\] with H = 3 \(from input 'q'\)"),
        ("cache_attention", "routed-rank", "shape", _with(a, 6, torch.ones(2, 1, 1, dtype=torch.bool)), {},
         r"input 'routed' has shape \[2, 1, 1\] \(rank 3\), expected rank 2: \[B, T\]"),
        ("cache_attention", "empty-key-width", "shape",
         _with(_with(_with(a, 0, torch.zeros(2, 3, 1, 0)), 1, torch.zeros(2, 3, 6, 0)), 4, torch.zeros(2, 3, 1, 0)),
         {}, r"input 'q' has shape \[2, 3, 1, 0\]: K must be at least 1"),
        ("cache_attention", "length-int32", "dtype", _with(a, 3, a[3].int()), {},
         r"input 'length' is int32, expected int64"),
        ("cache_attention", "v-float16", "dtype", _with(a, 5, a[5].half()), {},
         r"input 'v' is float16, expected float32 like input 'q'"),
        ("cache_attention", "q-float64", "dtype", _with(a, 0, a[0].double()), {},
         r"input 'q' is float64; the float inputs must be float32 or float16"),
        ("cache_attention", "routed-float", "dtype", _with(a, 6, a[6].float()), {},
         r"input 'routed' is float32, expected bool"),
        ("cache_append", "v-rank", "shape", _with(c, 5, torch.randn(2, 3, 1, 4, 1)), drop,
         r"input 'v' has shape \[2, 3, 1, 4, 1\] \(rank 5\), expected rank 4: \[B, H, T, V\]"),
        ("cache_append", "score_cache-capacity", "shape", _with(c, 2, torch.rand(2, 5)), drop,
         r"input 'score_cache' has shape \[2, 5\], expected \[B, C\] with C = 6 \(from input 'k_cache'\)"),
        ("cache_append", "score-float16", "dtype", _with(c, 6, c[6].half()), drop,
         r"input 'score' is float16, expected float32 like input 'k_cache'"),
        ("cache_append", "zero-capacity", "shape",
         _with(_with(_with(c, 0, torch.zeros(2, 3, 0, 4)), 1, torch.zeros(2, 3, 0, 4)), 2, torch.zeros(2, 0)), drop,
         r"input 'k_cache' has shape \[2, 3, 0, 4\]: C must be at least 1"),
        ("cache_append", "policy", "attribute", c, {"policy": "keep"},
         r"attribute 'policy' is 'keep'; it must be 'drop' or 'evict'"),
        ("gdn_prefill", "state-width", "shape", _with(g, 5, torch.randn(2, 2, 4, 5)), {},
         r"input 'state' has shape \[2, 2, 4, 5\], expected \[B, H, K, V\] with V = 4 \(from input 'v'\)"),
        ("gdn_prefill", "state-batch", "shape", _with(g, 5, torch.randn(1, 2, 4, 4)), {},
         r"input 'state' has shape \[1, 2, 4, 4\], expected \[B, H, K, V\] with B = 2 \(from input 'q'\)"),
        ("gdn_prefill", "g-rank", "shape", _with(g, 3, torch.rand(2, 3)), {},
         r"input 'g' has shape \[2, 3\] \(rank 2\), expected rank 3: \[B, T, H\]"),
        ("gdn_prefill", "no-tokens", "shape", [x[:, :0] for x in g[:5]] + [g[5]], {},
         r"input 'q' has shape \[2, 0, 2, 4\]: T must be at least 1"),
    ]


BAD = [pytest.param(impl, *case[2:], id=f"{case[0]}-{case[1]}-{impl.name}")
       for case in _bad_cases() for impl in IMPLEMENTATIONS[case[0]]]


@pytest.mark.parametrize(("impl", "kind", "inputs", "attributes", "message"), BAD)
def test_refused_before_anything_is_written(impl, kind, inputs, attributes, message):
    available(impl)
    if kind in ("shape", "dtype") and impl.name in NO_SHAPE_CHECKS:
        pytest.skip("a standard-op graph cannot check the sizes the spec ties together (see the module doc)")
    if kind == "dtype" and impl.name in NO_SHAPE_CHECKS:
        pytest.skip("ONNX Runtime checks the graph's input types")
    before = [x.clone() for x in inputs]
    own = OWN_MESSAGES.get(impl.name)
    if impl.name in INT32_MASKS:
        message = message.replace("expected bool", "expected int32")
    with pytest.raises(ImplError, match=".*" if own == "all" or own == kind else message):
        if impl.in_place:
            impl.write(inputs, attributes)
        else:
            impl.run(inputs, attributes)
    for x, b in zip(inputs, before, strict=True):
        torch.testing.assert_close(x, b, atol=0, rtol=0, equal_nan=True)


def _length_cases():
    a = attention(2, 2, 1, 6, k=4, v=4, lengths=[2, 6])  # T = 1: every attention kernel takes it
    c = append(2, 2, 3, 6, k=4, v=4, lengths=[2, 6], routed_p=1.0)
    return [("cache_attention", "too-long", _with(a, 3, torch.tensor([2, 7])), {}, 7, 1),
            ("cache_attention", "negative", _with(a, 3, torch.tensor([-1, 2])), {}, -1, 0),
            ("cache_append", "too-long", _with(c, 3, torch.tensor([2, 7])), {"policy": "evict"}, 7, 1),
            ("cache_append", "negative", _with(c, 3, torch.tensor([-3, 2])), {"policy": "drop"}, -3, 0)]


LENGTHS = [pytest.param(impl, *case[2:], id=f"{case[0]}-{case[1]}-{impl.name}")
           for case in _length_cases() for impl in IMPLEMENTATIONS[case[0]]]


@pytest.mark.parametrize(("impl", "inputs", "attributes", "bad", "row"), LENGTHS)
def test_lengths_outside_the_cache_are_refused(impl, inputs, attributes, bad, row):
    """On the host: an error naming the value. In a kernel: the row is left alone, flagged (overflow -1, NaN
    attention), and the other rows are computed as usual."""
    available(impl)
    reason = impl.accepts(SPECS[impl.op].check(inputs, attributes, values=False))
    if reason:
        pytest.skip(f"{impl.name}: {reason}")
    if impl.host_checks:
        with pytest.raises(ImplError, match=rf"input 'length' holds {bad} at batch {row}, outside \[0, C\] with "
                                            r"C = 6"):
            impl.run(inputs, attributes)
    if not impl.refuses_on_device:
        return
    outputs = impl.run(inputs, attributes, host_check=False)
    good = 1 - row
    if impl.op == "cache_attention":
        assert bool(outputs[0][row].isnan().all()) and bool(outputs[0][good].isfinite().all())
        return
    k_cache, v_cache, score_cache, length, overflow = outputs
    assert overflow[row] == -1 and length[row] == bad and overflow[good] >= 0
    for got, given in zip((k_cache, v_cache, score_cache), inputs[:3], strict=False):
        torch.testing.assert_close(got[row], given[row], atol=0, rtol=0, equal_nan=True)
