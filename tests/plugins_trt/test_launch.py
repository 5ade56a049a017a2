"""What each QDP launches, checked without TensorRT: the entry kernel's arguments are the op spec's (inputs, int32
sizes, outputs), its grid and scalars are the native Triton launcher's for the same shapes, its outputs equal the
native launcher's (under the interpreter), and its PTX compiles for sm_87, sm_89 and sm_90 with the parameter list
TensorRT's launcher fills. (The entry kernels against the reference, at every case and threshold pattern of the op
suites, are the ``trt-launch`` implementations of ``tests/ops``.)"""

from __future__ import annotations

import pytest
import torch

from ham_export.kernels import cache_append as ka
from ham_export.kernels import gdn as kg
from ham_export.kernels import prefill_attention as kp
from ham_export.plugins_trt import launch as L
from ham_export.plugins_trt.specs import PLUGINS

from ..ops.inputs import append, attention, gdn
from .conftest import run_compiled

ATTRS = {"CacheAttention": None, "CacheAppend": {"policy": "evict"}, "GdnPrefill": None}


def make_inputs(op: str, dtype=torch.float32, routed_p: float = 0.6):
    """(inputs in spec order with bool routed, sizes) of a small call with a few blocks of new tokens."""
    if op == "CacheAttention":
        inputs = attention(2, 3, 70, 40, k=16, v=12, lengths=[5, 40], routed_p=routed_p, dtype=dtype)
    elif op == "CacheAppend":
        inputs = append(2, 3, 37, 40, k=16, v=12, lengths=[5, 30], routed_p=routed_p, dtype=dtype)
    else:
        inputs = gdn(2, 45, 3, 16, 12, dtype=dtype)
    return inputs


def plugin_form(inputs):
    return [x.to(torch.int32) if x.dtype == torch.bool else x.contiguous() for x in inputs]


@pytest.mark.parametrize("op", list(PLUGINS))
def test_the_kernel_arguments_are_the_spec_in_tensorrt_order(op):
    plugin = PLUGINS[op]
    lau = L.launch(op, "float16", {"K": 16, "V": 12, "C": 40}, ATTRS[op])
    signature = lau.signature()
    names = list(signature)
    n_in, n_out = len(plugin.op.inputs), len(plugin.op.outputs)
    assert names[:n_in] == [f"{a.name}_ptr" for a in plugin.op.inputs]
    assert names[n_in:len(names) - n_out] == list(lau.sizes)
    assert names[len(names) - n_out:] == [f"{a.name}_ptr" for a in plugin.op.outputs]
    kinds = {"T": "*fp16", "int64": "*i64", "int32": "*i32"}
    assert [signature[f"{a.name}_ptr"] for a in plugin.op.inputs] == [kinds[k] for k in plugin.input_dtypes]
    assert [signature[s] for s in lau.sizes] == ["i32"] * len(lau.sizes)
    assert signature.get("routed_ptr", "*i32") == "*i32"  # never a bool: TensorRT plugins take none


def test_a_kernel_that_does_not_follow_the_spec_is_refused():
    good = L.launch("CacheAttention", "float32", {"K": 16, "V": 12})
    with pytest.raises(L.LaunchError, match="plugin ABI of CacheAttention"):
        L.Launch(good.plugin, "float32", kg.gdn_prefill_trt, good.sizes, good.constexprs, good.grid_fn, 4)


def test_sizes_the_kernel_is_built_for_must_be_fixed():
    with pytest.raises(L.LaunchError, match="K must be fixed when the engine is built"):
        L.launch("GdnPrefill", "float32", {"K": None, "V": 8})
    with pytest.raises(L.LaunchError, match="C must be fixed"):
        L.launch("CacheAppend", "float32", {"K": 8, "V": 8}, {"policy": "drop"})
    with pytest.raises(L.LaunchError, match="dtype must be one of"):
        L.launch("GdnPrefill", "float64", {"K": 8, "V": 8})


def test_a_launch_refuses_tensors_of_other_sizes_than_it_was_built_for():
    inputs = plugin_form(make_inputs("GdnPrefill"))
    lau = L.launch("GdnPrefill", "float32", {"K": 32, "V": 12})
    outputs = [torch.empty_like(inputs[2]), torch.empty_like(inputs[2]), torch.empty_like(inputs[5])]
    with pytest.raises(L.LaunchError, match="K = 16, but the kernel was built for K = 32"):
        lau.run(inputs, outputs)


class Recorder:
    """Stands in for a native kernel: records each launch's grid and named arguments, then launches it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((tuple(grid), dict(zip(self.kernel.arg_names, args, strict=False))))
            return self.kernel[grid](*args, **kwargs)
        return launch


NATIVE = {  # op -> (module, kernel attribute, the native launcher on spec-order inputs)
    "CacheAttention": (kp, "_prefill_attention_kernel", lambda x: [kp.prefill_attention(*x)]),
    "CacheAppend": (ka, "_cache_append_kernel", lambda x: [
        *(c := [t.clone() for t in x[:4]]), ka.cache_append_(*c, *x[4:], "evict")]),
    "GdnPrefill": (kg, "_gdn_chunked_kernel", lambda x: list(kg.gdn_chunked(*x))),
}


@pytest.mark.parametrize("op", list(PLUGINS))
def test_grid_scalars_and_outputs_equal_the_native_launchers(op, monkeypatch):
    inputs = make_inputs(op)
    module, attribute, native = NATIVE[op]
    recorder = Recorder(getattr(module, attribute))
    monkeypatch.setattr(module, attribute, recorder)
    want = native(inputs)
    monkeypatch.undo()
    [(grid, args)] = recorder.calls

    plugin = PLUGINS[op]
    lau = L.launch_for(op, plugin_form(inputs), ATTRS[op], interpreted=True)
    dims = L.sizes_of(plugin, inputs)
    assert lau.grid(dims) == grid
    assert lau.scalars(dims) == tuple(args[letter] for letter in lau.sizes)

    outputs = ([t.clone() for t in inputs[:3]] + [torch.empty_like(inputs[3]) for _ in range(2)]
               if op == "CacheAppend" else [torch.empty_like(w) for w in want])
    lau.run(plugin_form(inputs), outputs, ATTRS[op])
    for got, ref in zip(outputs, want, strict=True):
        if op == "CacheAttention":  # the same softmax over the new tokens in other blocks: rounding apart
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        else:  # the same kernel body: bit for bit
            torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)


COMPILE = """
import json, sys
from ham_export.plugins_trt import launch as L
out = []
for op, dtype, cc, isa in json.loads(sys.argv[1]):
    attrs = {"policy": "evict"} if op == "CacheAppend" else None
    lau, k = L.compile_fitting(op, dtype, {"K": 64, "V": 64, "C": 256}, attrs, cc, isa)
    out.append(dict(op=op, dtype=dtype, cc=cc, name=k.name, target=k.target, isa=k.ptx_version, block=k.block_x,
                    warps=lau.num_warps, shared=k.shared, types=list(k.param_types),
                    signature=list(lau.signature().values()), entry=(".entry " + k.name + "(") in k.ptx,
                    reqntid=(".reqntid " + str(k.block_x)) in k.ptx))
print(json.dumps(out))
"""


def test_ptx_compiles_for_orin_ada_and_hopper_with_the_parameters_tensorrt_fills():
    jobs = [(op, "float16", cc, None) for op in PLUGINS for cc in (87, 89, 90)]
    jobs += [(op, dtype, 90, None) for op in PLUGINS for dtype in ("float32", "bfloat16")]
    jobs += [("CacheAppend", "float16", 90, 85)]
    rows = run_compiled(COMPILE, __import__("json").dumps(jobs))
    assert len(rows) == len(jobs)
    for row, (_, _, cc, isa) in zip(rows, jobs, strict=True):
        assert row["entry"] and row["reqntid"] and row["block"] == row["warps"] * 32, row
        assert row["target"] == ("sm_90a" if cc == 90 else f"sm_{cc}"), row
        if isa is not None:
            assert row["isa"] == "8.5", row
        # the declared parameters in order (pointers u64, int32 sizes u32), then Triton's two scratch pointers
        assert row["types"] == ["u32" if t == "i32" else "u64" for t in row["signature"]] + ["u64", "u64"], row
        assert row["shared"] <= L.SHARED_LIMIT


WIDE = """
import json
from ham_export.plugins_trt import launch as L
first = L.launch("CacheAttention", "float32", {"K": 128, "V": 128})
try:
    L.compile_ptx(first, 90)
    refused = False
except L.SharedMemoryError:
    refused = True
lau, k = L.compile_fitting("CacheAttention", "float32", {"K": 128, "V": 128}, None, 90)
print(json.dumps(dict(refused=refused, block_t=lau.constexprs["BLOCK_T"], stages=lau.num_stages, shared=k.shared)))
"""


def test_wide_heads_fall_back_to_blocks_that_fit_in_48_kib():
    row = run_compiled(WIDE)
    assert row["refused"] and row["shared"] <= L.SHARED_LIMIT
    assert (row["block_t"], row["stages"]) != (kp.BLOCK_T, kp.NUM_STAGES)


def test_compiling_under_the_interpreter_says_what_to_do():
    with pytest.raises(L.LaunchError, match="unset TRITON_INTERPRET"):
        L.compile_ptx(L.launch("GdnPrefill", "float32", {"K": 16, "V": 16}), 90)


GPU_RUN = """
import json, torch
from ham_export.ops import reference as ref
from ham_export.plugins_trt import launch as L
from tests.plugins_trt.test_launch import ATTRS, make_inputs, plugin_form
rows = []
for op in ("CacheAttention", "CacheAppend", "GdnPrefill"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for routed_p in (1.0, 0.0, 0.5):  # store every token, store none, half
            inputs = make_inputs(op, dtype, routed_p)
            fn = {"CacheAttention": ref.cache_attention, "CacheAppend": ref.cache_append,
                  "GdnPrefill": ref.gdn_chunked}[op]
            f32 = [x.float() if x.is_floating_point() else x for x in inputs]
            want = fn(*f32, *(ATTRS[op] or {}).values())
            want = list(want) if isinstance(want, tuple) else [want]
            gpu = [x.cuda() for x in plugin_form(inputs)]
            outs = ([x.clone() for x in gpu[:3]] + [torch.empty_like(gpu[3]) for _ in range(2)] if op == "CacheAppend"
                    else [torch.empty(w.shape, dtype=dtype if w.is_floating_point() else w.dtype, device="cuda")
                          for w in want])
            L.launch_for(op, gpu, ATTRS[op]).run(gpu, outs, ATTRS[op])
            torch.cuda.synchronize()
            err = max(float((o.cpu().float() - w.float()).nan_to_num().abs().max()) for o, w in zip(outs, want))
            rows.append(dict(op=op, dtype=str(dtype), routed_p=routed_p, err=err))
print(json.dumps(rows))
"""
TOL = {"torch.float32": 1e-4, "torch.float16": 2e-2, "torch.bfloat16": 1e-1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: launches the plugins' entry kernels")
def test_the_entry_kernels_on_a_gpu_match_the_reference():
    """Compiled and launched by Triton (as TensorRT would launch their PTX), at three routing patterns."""
    rows = run_compiled(GPU_RUN)
    assert len(rows) == 27
    bad = [r for r in rows if not r["err"] <= TOL[r["dtype"]]]
    assert not bad, bad
