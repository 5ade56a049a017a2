"""The op specs are the only place an op's names, shapes and preconditions are written: everything else follows.

- the torch.library schemas (functional and in place) and the fake kernels (a wrong shape fails at export);
- the ONNX schemas and the translations' argument order (which is the reference's);
- the C++ header ``runtimes/common/ham_op_spec.h`` (checked in; this test fails when it is stale) and the libtorch
  library's schemas made from it;
- the check itself: each precondition, with the message every implementation shares.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from ham_export.errors import InputError
from ham_export.ops import cpp, library
from ham_export.ops import reference as ref
from ham_export.ops.spec import (
    CACHE_APPEND,
    CACHE_ATTENTION,
    GDN_PREFILL,
    INVALID_LENGTH,
    MIN_SIZE,
    ONNX_DOMAIN,
    OPS,
    TORCH_NAMESPACE,
)

from .implementations import ROOT, libtorch_worker
from .inputs import append, attention, gdn

IDS = [spec.name for spec in OPS]


@pytest.mark.parametrize("spec", OPS, ids=IDS)
def test_torch_schemas_come_from_the_spec(spec):
    op = getattr(torch.ops.ham, spec.torch_name).default
    assert str(op._schema) == f"{TORCH_NAMESPACE}::{spec.torch_name}{spec.torch_schema()}"
    assert [a.name for a in op._schema.arguments] == [*spec.input_names, *(a.name for a in spec.attributes)]
    if spec.inplace is not None:
        inplace = getattr(torch.ops.ham, spec.inplace.name).default
        assert str(inplace._schema) == f"{TORCH_NAMESPACE}::{spec.inplace.name}{spec.inplace_schema()}"
        mutated = [a.name for a in inplace._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert mutated == list(spec.inplace.writes)


def test_only_cache_append_has_an_in_place_form():
    assert [s.name for s in OPS if s.inplace] == ["CacheAppend"]
    assert CACHE_APPEND.inplace_schema().startswith("(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) "
                                                    "score_cache, Tensor(d!) length, Tensor k")


@pytest.mark.parametrize("spec", OPS, ids=IDS)
def test_reference_takes_the_spec_order(spec):
    fn = ref.gdn_chunked if spec is GDN_PREFILL else getattr(ref, spec.torch_name)
    names = list(inspect.signature(fn).parameters)
    assert names[: len(spec.inputs) + len(spec.attributes)] == [*spec.input_names, *(a.name for a in spec.attributes)]


def test_the_cpp_header_is_up_to_date():
    """runtimes/common/ham_op_spec.h is what the generator writes from the specs (regenerate with
    python -m ham_export.ops.cpp)."""
    assert cpp.HEADER.read_text() == cpp.generate()
    stale = subprocess.run([sys.executable, "-m", "ham_export.ops.cpp", "--check"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert stale.returncode == 0, stale.stderr


def test_a_stale_header_is_detected(tmp_path):
    header = tmp_path / "ham_op_spec.h"
    header.write_text(cpp.generate().replace('"cache_append_"', '"cache_append_v2"'))
    assert cpp.main(["--check", "--output", str(header)]) == 1
    assert cpp.main(["--output", str(header)]) == 0 and cpp.main(["--check", "--output", str(header)]) == 0


def test_the_header_holds_every_name_letter_and_bound():
    text = cpp.HEADER.read_text()
    for spec in OPS:
        assert f'inline constexpr Op k{"".join(p.capitalize() for p in spec.torch_name.split("_"))}{{' in text
        assert spec.torch_schema() in text
        for arg in (*spec.inputs, *spec.outputs):
            assert f'{{"{arg.name}", ' in text and f'"{arg.shape}"}}' in text
    assert f'kOnnxDomain[] = "{ONNX_DOMAIN}"' in text and f"kMinSize = {MIN_SIZE}" in text
    assert f"kInvalidLength = {INVALID_LENGTH}" in text and "{kLength, 0, 'C'}" in text


@pytest.mark.parametrize("spec", OPS, ids=IDS)
def test_the_libtorch_library_registers_the_header_schemas(spec):
    from .implementations import _libtorch_missing

    if _libtorch_missing():
        pytest.skip(_libtorch_missing())
    worker = libtorch_worker()
    assert worker.call("_schema", spec.torch_name) == f"{TORCH_NAMESPACE}::{spec.torch_name}{spec.torch_schema()}"
    if spec.inplace is not None:
        assert worker.call("_schema", spec.inplace.name) == (f"{TORCH_NAMESPACE}::{spec.inplace.name}"
                                                            f"{spec.inplace_schema()}")


@pytest.mark.parametrize("spec", OPS, ids=IDS)
def test_the_onnx_schema_follows_the_spec(spec):
    onnx = pytest.importorskip("onnx")
    from ham_export.ops.onnx import register_schemas

    register_schemas()
    register_schemas()  # idempotent
    schema = onnx.defs.get_schema(spec.name, spec.version, ONNX_DOMAIN)
    assert (schema.name, schema.domain, schema.since_version) == (spec.name, ONNX_DOMAIN, spec.version)
    types = {"T": "T", "int64": "tensor(int64)", "bool": "tensor(bool)"}
    assert [(p.name, p.type_str) for p in schema.inputs] == [(a.name, types[a.dtype]) for a in spec.inputs]
    assert [(p.name, p.type_str) for p in schema.outputs] == [(a.name, types[a.dtype]) for a in spec.outputs]
    [constraint] = schema.type_constraints
    assert sorted(constraint.allowed_type_strs) == ["tensor(float)", "tensor(float16)"]
    assert sorted(schema.attributes) == sorted(a.name for a in spec.attributes)
    for attr in spec.attributes:
        assert schema.attributes[attr.name].required


def test_the_translations_take_the_spec_order():
    pytest.importorskip("onnxscript")
    from ham_export.ops.onnx import FORMS, translation_table

    for form in FORMS:
        table = translation_table(form)
        for spec in OPS:
            fn = table[getattr(torch.ops.ham, spec.torch_name).default]
            assert list(inspect.signature(fn).parameters) == [*spec.input_names, *(a.name for a in spec.attributes)]


# -------------------------------------------------------------------------------------------------- the check


def test_check_returns_the_size_of_every_letter():
    assert CACHE_ATTENTION.check(attention(2, 3, 4, 6, k=5, v=7)) == dict(B=2, H=3, T=4, K=5, C=6, V=7)
    assert GDN_PREFILL.check(gdn(1, 9, 2, 4, 3)) == dict(B=1, T=9, H=2, K=4, V=3)


def test_check_reads_lengths_on_the_host_only():
    inputs = append(2, 1, 1, 4, lengths=[0, 4])
    inputs[3] = torch.tensor([0, 5])
    with pytest.raises(InputError, match=r"ham::cache_append: input 'length' holds 5 at batch 1, outside \[0, C\] "
                                         r"with C = 4"):
        CACHE_APPEND.check(inputs, {"policy": "drop"})
    CACHE_APPEND.check(inputs, {"policy": "drop"}, values=False)  # a device implementation refuses in the kernel
    with torch.device("meta"):
        meta = [torch.empty_like(x, device="meta") for x in inputs]
    CACHE_APPEND.check(meta, {"policy": "drop"})  # not host-visible: no value check


def test_check_names_the_op_as_each_runtime_does():
    inputs = attention(1, 1, 1, 2)
    inputs[7] = torch.ones(2)
    with pytest.raises(InputError, match=r"^CacheAttention: input 'scale' has shape \[2\], expected \[H\] with H = 1"):
        CACHE_ATTENTION.check(inputs, prefix="CacheAttention")
    with pytest.raises(InputError, match=r"^ham::cache_attention: input 'scale'"):
        CACHE_ATTENTION.check(inputs)


def test_fake_kernels_refuse_a_wrong_shape_at_export_time():
    """A wrong shape fails while torch.export traces, with the spec's message, not later in an engine."""

    class Bad(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, length, k, v, routed, scale):
            return library.cache_attention(q, k_cache, v_cache, length, k, v, routed, scale[:1])

    inputs = attention(2, 3, 1, 6, k=4, v=4, lengths=[1, 2])
    with pytest.raises(Exception, match=r"input 'scale' has shape \[1\], expected \[H\] with H = 3"):
        torch.export.export(Bad(), tuple(inputs))


def test_fake_kernels_give_the_spec_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        inputs = [mode.from_tensor(x) for x in append(2, 3, 5, 7, k=4, v=6)]
        outs = library.cache_append(*inputs, "evict")
        overflow = library.cache_append_(*inputs, "drop")
        o, vhat, state = library.gdn_prefill(*[mode.from_tensor(x) for x in gdn(2, 5, 3, 4, 6)])
    assert [tuple(x.shape) for x in outs] == [(2, 3, 7, 4), (2, 3, 7, 6), (2, 7), (2,), (2,)]
    assert [x.dtype for x in outs] == [torch.float32] * 3 + [torch.int64] * 2
    assert tuple(overflow.shape) == (2,) and overflow.dtype == torch.int64
    assert tuple(o.shape) == tuple(vhat.shape) == (2, 5, 3, 6) and tuple(state.shape) == (2, 3, 4, 6)
