"""The HAM ops as TensorRT Quickly Deployable Plugins with ahead-of-time implementations (``tensorrt.plugin``,
TensorRT 10.9 or newer, not 10.14.x). Importing this module registers them, under the namespace ``ham``; do it before
parsing the rewritten ONNX (:mod:`.rewrite`, mode ``qdp``).

For each op, made from its spec (:mod:`.specs`):

- ``register``: the inputs as ``TensorDesc``s, the op's attributes (``str``), and the outputs: shapes from the
  spec's letters, dtypes from the spec (the float type T, int64, int32), the caches as ``aliased()`` inputs;
- ``aot_impl``: the Triton entry kernel compiled to PTX for the build GPU (:func:`.launch.compile_fitting`), its
  grid and int32 scalars as shape expressions, ``block_x = num_warps * 32`` and its shared memory.

The engine then holds the PTX: it runs under the plain C++ TensorRT runtime (``trtexec --loadEngine``) with no Python
and no plugin library. TensorRT passes every registered attribute to ``aot_impl`` positionally, so each function
declares all of them, in order. Not run on TensorRT yet: see ``plugins_trt/README.md``.

This module has no ``from __future__ import annotations``: TensorRT checks the annotations as classes.
"""

import inspect
import logging
from typing import Any, Tuple, Union  # noqa: UP035  (TensorRT checks these typing forms)

import tensorrt as trt
import tensorrt.plugin as trtp

from ham_export.ops.spec import FLOAT_DTYPES, dtype_name

from .launch import compile_fitting
from .specs import PLUGINS, QDP_NAMESPACE, PluginSpec, first_float_input, letter_sources, output_shapes

log = logging.getLogger(__name__)

_DTYPES = {"int64": trt.int64, "int32": trt.int32}
_FLOATS = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
assert {dtype_name(d) for d in FLOAT_DTYPES} == set(_FLOATS.values())


class Target:
    """The GPU the PTX is for: compute capability (None: the current device's) and PTX ISA (None: Triton's)."""

    cc: int | None = None
    ptx_version: int | None = None


def configure(cc: int | None = None, ptx_version: int | None = None) -> None:
    """Set the compute capability and PTX ISA version of the kernels built from now on."""
    Target.cc, Target.ptx_version = cc, ptx_version


def _current_cc() -> int:
    import triton

    return triton.runtime.driver.active.get_current_target().arch


def _register_fn(plugin: PluginSpec):
    n_in = len(plugin.op.inputs)

    def register(*args: Any, **attributes: Any):
        descs = args[:n_in]
        shapes = output_shapes(plugin, [d.shape_expr for d in descs])
        float_type = descs[first_float_input(plugin)].dtype
        outputs = []
        for i, (kind, shape) in enumerate(zip(plugin.output_dtypes, shapes, strict=True)):
            if i in plugin.aliases:
                outputs.append(descs[plugin.aliases[i]].aliased())
            else:
                outputs.append(trtp.from_shape_expr(shape, dtype=float_type if kind == "T" else _DTYPES[kind]))
        return tuple(outputs)

    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
              for a in plugin.op.inputs]
    params += [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)
               for a in plugin.op.attributes]
    register.__signature__ = inspect.Signature(
        params, return_annotation=Tuple[tuple(trtp.TensorDesc for _ in plugin.op.outputs)])  # noqa: UP006
    register.__name__ = register.__qualname__ = plugin.name
    return register


def _aot_impl_fn(plugin: PluginSpec):
    n_in, n_attr = len(plugin.op.inputs), len(plugin.op.attributes)
    where = letter_sources(plugin)

    def aot_impl(*args: Any):
        descs = args[:n_in]
        attributes = {a.name: v for a, v in zip(plugin.op.attributes, args[n_in:n_in + n_attr], strict=True)}
        dims = {letter: descs[i].shape_expr[d] for letter, (i, d) in where.items()}
        static = {letter: e.constant_value() if e.is_constant else None for letter, e in dims.items()}
        dtype = _FLOATS[descs[first_float_input(plugin)].dtype]
        cc = Target.cc if Target.cc is not None else _current_cc()
        lau, kernel = compile_fitting(plugin.op.name, dtype, static, attributes, cc, Target.ptx_version)
        log.info("%s: %s (%s, sm_%s, PTX %s, %s threads, %s bytes shared)", plugin.name, kernel.name, dtype, cc,
                 kernel.ptx_version, kernel.block_x, kernel.shared)
        params = trtp.KernelLaunchParams()
        grid = lau.grid(dims, trtp.cdiv)
        params.grid_x = grid[0]
        if len(grid) > 1:
            params.grid_y = grid[1]
        params.block_x = kernel.block_x
        params.shared_mem = kernel.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in lau.scalars(dims)])
        return kernel.name, kernel.ptx, params, extra

    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
              for a in plugin.op.inputs]
    params += [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)
               for a in plugin.op.attributes]
    params += [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 annotation=Tuple[trtp.TensorDesc]),  # noqa: UP006
               inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    aot_impl.__signature__ = inspect.Signature(params, return_annotation=Tuple[  # noqa: UP006
        Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs])  # noqa: UP007
    aot_impl.__name__ = aot_impl.__qualname__ = f"{plugin.name}_aot_impl"
    return aot_impl


def _register_all() -> None:
    for plugin in PLUGINS.values():
        plugin_id = plugin.plugin_id("qdp")
        trtp.register(plugin_id)(_register_fn(plugin))
        trtp.aot_impl(plugin_id)(_aot_impl_fn(plugin))


_register_all()
REGISTERED = tuple(p.plugin_id("qdp") for p in PLUGINS.values())
assert all(i.startswith(f"{QDP_NAMESPACE}::") for i in REGISTERED)
