"""A stand-in for ``tensorrt`` and ``tensorrt.plugin``, written from their documented rules (shared/notes/tensorrt.md
section 1: ``register`` and ``aot_impl`` signatures, ``aliased()``, shape expressions, ``KernelLaunchParams``,
``SymIntExprs``), so that ``ham_export.plugins_trt.qdp`` can be imported and its functions called here. It checks
what TensorRT's own validation checks; it is not TensorRT, and what only TensorRT can say (the launch itself) stays
unverified. Run as a script in a child with compiled kernels: prints one JSON line."""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing

# -- tensorrt -----------------------------------------------------------------------------------------------------


class DataType:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


trt = types.ModuleType("tensorrt")
trt.__version__ = "stand-in"
trt.float32, trt.float16, trt.bfloat16, trt.int32, trt.int64 = (DataType(n) for n in
                                                                ("FLOAT", "HALF", "BF16", "INT32", "INT64"))


# -- shape expressions: constants, or named dynamic sizes ------------------------------------------------------------


class Expr:
    def __init__(self, value: int | None = None, text: str | None = None) -> None:
        self.value, self.text = value, text if text is not None else str(value)

    @property
    def is_constant(self) -> bool:
        return self.value is not None

    def constant_value(self) -> int:
        if self.value is None:
            raise RuntimeError("Not accessible for non-constant shape expressions")
        return self.value

    def _op(self, other, fn, sym):
        other = other if isinstance(other, Expr) else Expr(other)
        if self.is_constant and other.is_constant:
            return Expr(fn(self.value, other.value))
        return Expr(None, f"({self.text}{sym}{other.text})")

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b, "*")

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b, "+")

    def __bool__(self):
        raise RuntimeError("a shape expression has no truth value")


def cdiv(a, b):
    a = a if isinstance(a, Expr) else Expr(a)
    return a._op(b, lambda x, y: -(-x // y), "/^")


class TensorDesc:
    def __init__(self, shape_expr, dtype, alias_of=None) -> None:
        self.shape_expr, self.dtype, self.alias_of = tuple(shape_expr), dtype, alias_of

    def aliased(self) -> TensorDesc:
        return TensorDesc(self.shape_expr, self.dtype, alias_of=self)


def from_shape_expr(shape_expr, dtype):
    assert isinstance(dtype, DataType), dtype
    return TensorDesc([e if isinstance(e, Expr) else Expr(e) for e in shape_expr], dtype)


class KernelLaunchParams:
    __slots__ = ("block_x", "block_y", "block_z", "grid_x", "grid_y", "grid_z", "shared_mem")

    def __init__(self) -> None:
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class SymInt32:
    def __init__(self, value) -> None:
        if isinstance(value, float):
            raise TypeError("Float symbolic expressions are not supported")
        self.value = value


class SymExprs(list):
    pass


class SymIntExprs(SymExprs):
    @classmethod
    def from_tuple(cls, items):
        return cls(items)


ATTRIBUTE_TYPES = (int, float, str, bool, bytes)
REGISTRY: dict[str, dict] = {}


def register(plugin_id: str):
    namespace, name = plugin_id.split("::")
    assert "." not in namespace and "." not in name and namespace not in ("", "trt", "tensorrt", "std"), plugin_id

    def decorate(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        n_desc = 0
        for p in params:
            assert p.annotation is not inspect.Parameter.empty, f"{p.name} has no annotation"
            if p.annotation is TensorDesc:
                assert n_desc == params.index(p), "TensorDescs come first"
                n_desc += 1
            else:
                assert p.annotation in ATTRIBUTE_TYPES, p
                assert p.name not in ("outputs", "stream", "tactic")
            assert p.default is inspect.Parameter.empty, "no default values"
        ret = sig.return_annotation
        assert typing.get_origin(ret) is tuple and all(a is TensorDesc for a in typing.get_args(ret)), ret
        REGISTRY[plugin_id] = {"register": fn, "inputs": [p.name for p in params[:n_desc]],
                               "attrs": [p.name for p in params[n_desc:]], "outputs": len(typing.get_args(ret))}
        return fn
    return decorate


def aot_impl(plugin_id: str):
    def decorate(fn):
        entry = REGISTRY[plugin_id]
        sig = inspect.signature(fn)
        schema = f"({', '.join([*entry['inputs'], *entry['attrs'], 'outputs', 'tactic'])})"
        assert f"({', '.join(sig.parameters)})" == schema, (plugin_id, list(sig.parameters), schema)
        assert sig.return_annotation is not inspect.Parameter.empty, "No return annotation found for aot_impl"
        entry["aot_impl"] = fn
        return fn
    return decorate


trtp = types.ModuleType("tensorrt.plugin")
for _name, _value in dict(TensorDesc=TensorDesc, from_shape_expr=from_shape_expr, KernelLaunchParams=KernelLaunchParams,
                          SymInt32=SymInt32, SymExprs=SymExprs, SymIntExprs=SymIntExprs, register=register,
                          aot_impl=aot_impl, cdiv=cdiv).items():
    setattr(trtp, _name, _value)
trt.plugin = trtp
sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp


# -- drive ham_export.plugins_trt.qdp ----------------------------------------------------------------------------------


def text(e) -> str:
    return e.text if isinstance(e, Expr) else str(e)


def main() -> None:
    from ham_export.plugins_trt import qdp
    from ham_export.plugins_trt.launch import launch
    from ham_export.plugins_trt.specs import PLUGINS

    qdp.configure(cc=90, ptx_version=85)
    fixed = {"H": 4, "C": 256, "K": 32, "V": 24}
    dtype = {"T": trt.float16, "int64": trt.int64, "int32": trt.int32}
    report = {"registered": sorted(REGISTRY)}
    for op, plugin in PLUGINS.items():
        entry = REGISTRY[plugin.plugin_id("qdp")]
        descs = [TensorDesc([Expr(fixed[c]) if c in fixed else Expr(None, c) for c in arg.shape], dtype[kind])
                 for arg, kind in zip(plugin.op.inputs, plugin.input_dtypes, strict=True)]
        attrs = {a: "evict" for a in entry["attrs"]}
        outputs = entry["register"](*descs, **attrs)
        aot = entry["aot_impl"](*descs, *attrs.values(), outputs, 0)
        name, ptx, params, extra = aot
        lau = launch(op, "float16", fixed, attrs or None)
        report[op] = {
            "inputs": entry["inputs"], "attrs": entry["attrs"], "n_outputs": entry["outputs"],
            "outputs": [{"shape": [text(e) for e in o.shape_expr], "dtype": o.dtype.name,
                         "alias": None if o.alias_of is None else descs.index(o.alias_of)} for o in outputs],
            "kernel": name, "ptx_has_entry": f".entry {name}(" in ptx, "ptx_isa_85": ".version 8.5" in ptx,
            "grid": [text(params.grid_x), text(params.grid_y), text(params.grid_z)], "block_x": params.block_x,
            "shared": params.shared_mem, "extra": [text(s.value) for s in extra],
            "launch_kernel": lau.kernel_name, "launch_warps": lau.num_warps, "launch_sizes": list(lau.sizes),
            "scale_is_int": not any(isinstance(s.value, float) for s in extra),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
