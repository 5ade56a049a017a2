"""The Quickly Deployable Plugins (``ham_export.plugins_trt.qdp``) against a stand-in of ``tensorrt.plugin`` that
checks what TensorRT's own validation checks (``qdp_standin.py``): the signatures TensorRT accepts, output shapes,
dtypes and aliases from the op spec, and an ``aot_impl`` that returns the entry kernel's PTX with the grid, block and
int32 scalars of :mod:`ham_export.plugins_trt.launch`. TensorRT itself is not here: building and running these
plugins is for scripts/trt-check.sh."""

from __future__ import annotations

from pathlib import Path

import pytest

from ham_export.plugins_trt.specs import PLUGINS

from .conftest import run_compiled

STANDIN = (Path(__file__).parent / "qdp_standin.py").read_text()


@pytest.fixture(scope="module")
def report():
    return run_compiled(STANDIN)


def test_every_plugin_registers_under_the_qdp_namespace(report):
    assert report["registered"] == sorted(p.plugin_id("qdp") for p in PLUGINS.values())
    assert all(i.startswith("ham::Ham") for i in report["registered"])


@pytest.mark.parametrize("op", list(PLUGINS))
def test_register_gives_the_specs_outputs(report, op):
    plugin, row = PLUGINS[op], report[op]
    assert row["inputs"] == [a.name for a in plugin.op.inputs]
    assert row["attrs"] == [a.name for a in plugin.op.attributes]
    assert row["n_outputs"] == len(plugin.op.outputs)
    fixed = {"H": "4", "C": "256", "K": "32", "V": "24"}
    names = {"T": "HALF", "int64": "INT64", "int32": "INT32"}
    for index, (arg, kind, out) in enumerate(zip(plugin.op.outputs, plugin.output_dtypes, row["outputs"],
                                                 strict=True)):
        assert out["shape"] == [fixed.get(c, c) for c in arg.shape], arg.name
        assert out["dtype"] == names[kind], arg.name
        assert out["alias"] == plugin.aliases.get(index), arg.name


@pytest.mark.parametrize("op", list(PLUGINS))
def test_aot_impl_returns_the_launch(report, op):
    row = report[op]
    assert row["kernel"] == row["launch_kernel"] and row["ptx_has_entry"] and row["ptx_isa_85"]
    assert row["block_x"] == 32 * row["launch_warps"] and 0 < row["shared"] <= 48 * 1024
    assert row["extra"] == [{"H": "4", "C": "256", "K": "32", "V": "24"}.get(s, s) for s in row["launch_sizes"]]
    assert row["scale_is_int"]
    grid = {"CacheAttention": ["(B*4)", "(T/^64)", "1"], "CacheAppend": ["B", "1", "1"],
            "GdnPrefill": ["(B*4)", "1", "1"]}[op]
    assert row["grid"] == grid
