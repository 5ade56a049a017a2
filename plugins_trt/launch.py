"""What each plugin launches, in plain functions that need no TensorRT: the Triton kernel, its argument order, its
grid and int32 scalars as functions of the shapes, and its PTX for a GPU target and PTX ISA version.

TensorRT's ahead-of-time Quickly Deployable Plugins (:mod:`.qdp`) launch one kernel per plugin with the arguments
``(input pointers..., int32 scalars..., output pointers...)``, no workspace and no float scalar. Each op has an
entry kernel in that form next to the native path's kernels (``cache_attention_trt``, ``cache_append_trt``,
``gdn_prefill_trt`` in :mod:`ham_export.kernels`); it calls the native kernel's body with the strides of contiguous
tensors, and the grid comes from the same function the native launcher uses. A :class:`Launch` checks the entry
kernel's parameters against the op spec (input names, the size letters, output names), so the argument order is
the spec's.

The constexprs that depend on sizes (head widths, the cache capacity of the append) need those sizes fixed when
the engine is built: :func:`launch` raises :class:`LaunchError` when one is dynamic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import triton

from ham_export.errors import InputError
from ham_export.kernels import cache_append as _append
from ham_export.kernels import gdn as _gdn
from ham_export.kernels import prefill_attention as _attention
from ham_export.ops.spec import CACHE_APPEND, CACHE_ATTENTION, GDN_PREFILL, INVALID_LENGTH

from .specs import PLUGINS, PluginSpec, first_float_input

FLOAT_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
INT_TYPES = {"int64": "i64", "int32": "i32"}
TARGETS = {"sm_87": 87, "sm_89": 89, "sm_90": 90}  # Jetson Orin, Ada, Hopper: the PTX the tests compile
SHARED_LIMIT = 48 * 1024  # static shared memory a launch may ask without the opt-in attribute TensorRT may not set
SIZE_LIMIT = 2**31 - 1  # the scalars are int32


class LaunchError(InputError):
    """A plugin that cannot be launched as asked (a dynamic size a constexpr needs, a kernel TensorRT cannot run)."""


class SharedMemoryError(LaunchError):
    """A configuration that asks more shared memory than :data:`SHARED_LIMIT`: :func:`compile_fitting` tries the
    next one."""


# The attention's configurations, largest first: (BLOCK_T, BLOCK_C, BLOCK_S, num_stages). The native path's own
# comes first; wide heads in fp32 need smaller blocks to fit in 48 KiB of shared memory.
ATTENTION_CONFIGS = ((_attention.BLOCK_T, _attention.BLOCK_C, _attention.BLOCK_S, _attention.NUM_STAGES),
                     (64, 32, 32, 1), (32, 32, 32, 1), (16, 16, 16, 1))


@dataclass(frozen=True)
class Launch:
    """One plugin's kernel launch: the entry kernel, the size letters it takes as int32 scalars (after the
    inputs), its constexprs, grid and launch options."""

    plugin: PluginSpec
    dtype: str  # the op's float type: float32, float16 or bfloat16
    kernel: Any  # a @triton.jit entry in TensorRT's ABI
    sizes: tuple[str, ...]
    constexprs: Mapping[str, Any]
    grid_fn: Callable[..., tuple]
    num_warps: int
    num_stages: int | None = None  # None: Triton's default
    static: Mapping[str, int] = field(default_factory=dict)  # the sizes the constexprs were made for
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        op = self.plugin.op
        params = tuple(self.kernel.arg_names)
        want = (*(f"{a.name}_ptr" for a in op.inputs), *self.sizes, *(f"{a.name}_ptr" for a in op.outputs),
                *self.constexprs)
        if params != want:
            raise LaunchError(f"{self.plugin.name}: kernel {self.kernel_name} takes ({', '.join(params)}); the "
                              f"plugin ABI of {op.name} is ({', '.join(want)})")
        object.__setattr__(self, "params", params[:len(params) - len(self.constexprs)])

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__name__

    def signature(self) -> dict[str, str]:
        """Triton's signature of the runtime parameters: a pointer type per tensor, ``i32`` per size."""
        kinds = (*self.plugin.input_dtypes, *(["int32"] * len(self.sizes)), *self.plugin.output_dtypes)
        sizes = set(self.sizes)
        return {name: ("i32" if name in sizes else "*" + _element(kind, self.dtype))
                for name, kind in zip(self.params, kinds, strict=True)}

    def grid(self, dims: Mapping[str, Any], cdiv: Callable[[Any, int], Any] = triton.cdiv) -> tuple:
        """The grid from the sizes of the shape letters: ints, or TensorRT's shape expressions with ``trtp.cdiv``."""
        return self.grid_fn(dims, cdiv)

    def scalars(self, dims: Mapping[str, Any]) -> tuple:
        """The int32 scalars, in order."""
        return tuple(dims[letter] for letter in self.sizes)

    def run(self, inputs: Sequence[Any], outputs: Sequence[Any], attributes: Mapping[str, str] | None = None
            ) -> None:
        """Launch on torch tensors (contiguous, routed as int32), with Triton's own launcher: on a GPU, or on the
        CPU under ``TRITON_INTERPRET=1``. The inputs are checked against the op spec first (the lengths are not:
        the kernel refuses a bad one, as on a GPU). The tests compare this with the native launcher and the
        reference."""
        import torch

        self.plugin.op.check(inputs, attributes, values=False, bool_dtype=torch.int32, prefix=self.plugin.name)
        dims = sizes_of(self.plugin, inputs)
        for letter, value in self.static.items():
            if dims[letter] != value:
                raise LaunchError(f"{self.plugin.name}: {letter} = {dims[letter]}, but the kernel was built for "
                                  f"{letter} = {value}")
        for letter in self.sizes:
            if dims[letter] > SIZE_LIMIT:
                raise LaunchError(f"{self.plugin.name}: {letter} = {dims[letter]} does not fit an int32 scalar")
        tensors = [name for name in self.params if name not in self.sizes]
        for name, t in zip(tensors, (*inputs, *outputs), strict=True):
            if not t.is_contiguous():
                raise LaunchError(f"{self.plugin.name}: {name} must be contiguous")
        options = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        self.kernel[self.grid(dims)](*inputs, *self.scalars(dims), *outputs, **self.constexprs, **options)


@dataclass(frozen=True)
class CompiledKernel:
    """A launch compiled for one GPU: what TensorRT's ``aot_impl`` returns, less the symbolic grid and scalars."""

    name: str  # the PTX .entry
    ptx: str
    block_x: int  # threads per block: num_warps * 32 (the PTX's .reqntid)
    shared: int  # bytes of shared memory per block
    ptx_version: str  # the PTX ISA, e.g. "8.7"
    target: str  # e.g. "sm_90a"
    param_types: tuple[str, ...]  # each .entry parameter's PTX type (u64 pointers, u32 scalars), Triton's two
    # trailing scratch pointers included


def _element(kind: str, dtype: str) -> str:
    return FLOAT_TYPES[dtype] if kind == "T" else INT_TYPES[kind]


def sizes_of(plugin: PluginSpec, inputs: Sequence[Any]) -> dict[str, int]:
    """The size of each shape letter, from the inputs' shapes (their first appearance, as the op spec binds them)."""
    dims: dict[str, int] = {}
    for arg, x in zip(plugin.op.inputs, inputs, strict=True):
        for letter, size in zip(arg.shape, x.shape, strict=True):
            dims.setdefault(letter, int(size))
    return dims


def _static(plugin: PluginSpec, sizes: Mapping[str, int | None], letter: str, why: str) -> int:
    size = sizes.get(letter)
    if size is None:
        raise LaunchError(f"{plugin.name}: {letter} must be fixed when the engine is built ({why}); it is dynamic")
    return int(size)


def configs(op: str) -> int:
    """How many configurations :func:`launch` has for ``op``."""
    return len(ATTENTION_CONFIGS) if op == CACHE_ATTENTION.name else 1


def launch(op: str, dtype: str, sizes: Mapping[str, int | None], attributes: Mapping[str, str] | None = None, *,
           config: int = 0, interpreted: bool = False) -> Launch:
    """The launch of op ``op``'s plugin (its ONNX name: ``CacheAttention``, ``CacheAppend``, ``GdnPrefill``).

    Args:
        dtype: the float type, ``float32``, ``float16`` or ``bfloat16``.
        sizes: the size of each shape letter known when the engine is built (None or absent: dynamic).
        attributes: the op's attributes (``policy`` of the append).
        config: which of the op's configurations (:func:`configs`; 0 is the native path's).
        interpreted: for a run under ``TRITON_INTERPRET=1`` (whose bf16 dots need an upcast, see
            :mod:`ham_export.kernels.prefill_attention`); never for PTX.
    """
    if dtype not in FLOAT_TYPES:
        raise LaunchError(f"dtype must be one of {', '.join(FLOAT_TYPES)}, got {dtype!r}")
    plugin = PLUGINS[op]
    plugin.op.check_attributes(attributes, prefix=plugin.name)
    kd = _static(plugin, sizes, "K", "the key width sets the kernel's blocks")
    vd = _static(plugin, sizes, "V", "the value width sets the kernel's blocks")
    if not 0 <= config < configs(op):
        raise LaunchError(f"{plugin.name} has {configs(op)} configuration(s), asked for {config}")
    if op == CACHE_ATTENTION.name:
        block_t, block_c, block_s, stages = ATTENTION_CONFIGS[config]
        return Launch(plugin, dtype, _attention.cache_attention_trt, ("H", "T", "C", "K", "V"), dict(
            BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_S=block_s, **_attention.head_blocks(kd, vd),
            DOT_PRECISION=_attention.DOT_PRECISION, QK_FP32=interpreted and dtype == "bfloat16"),
            lambda dims, cdiv: _attention.grid(dims, cdiv, block_t), _attention.NUM_WARPS, stages, {"K": kd, "V": vd})
    if op == CACHE_APPEND.name:
        c = _static(plugin, sizes, "C", "the capacity sets the eviction's block")
        return Launch(plugin, dtype, _append.cache_append_trt, ("H", "C", "T", "K", "V"), dict(
            EVICT=attributes["policy"] == "evict", **_append.blocks(sizes.get("T"), c),
            BLOCK_K=triton.next_power_of_2(kd), BLOCK_V=triton.next_power_of_2(vd), INVALID=INVALID_LENGTH),
            _append.grid, _append.NUM_WARPS, None, {"K": kd, "V": vd, "C": c})
    if op == GDN_PREFILL.name:
        if kd > _gdn.MAX_K:
            raise LaunchError(f"{plugin.name}: K = {kd} is wider than the {_gdn.MAX_K} key columns a program keeps")
        blocks = _gdn.chunked_blocks(kd, vd)
        return Launch(plugin, dtype, _gdn.gdn_prefill_trt, ("T", "H", "K", "V"), dict(
            BT=_gdn.CHUNK, **blocks, SCALE=1.0 / math.sqrt(kd)),
            lambda dims, cdiv: _gdn.chunked_grid(dims, cdiv, blocks["BLOCK_V"]),
            _gdn.NUM_WARPS, _gdn.CHUNK_STAGES, {"K": kd, "V": vd})
    raise LaunchError(f"no plugin launch for op {op!r}")


def compile_ptx(lau: Launch, cc: int, ptx_version: int | None = None) -> CompiledKernel:
    """Compile a launch to PTX for compute capability ``cc`` (87 Jetson Orin, 89 Ada, 90 Hopper, ...), no GPU
    needed. ``ptx_version``: the PTX ISA as Triton's option writes it (``85`` for 8.5; None: the newest Triton's
    ptxas knows); pin it to one the target's driver accepts.

    Raises:
        LaunchError: when the kernel needs what a TensorRT launch does not give: global scratch memory, more than
            one CTA per cluster, or more than :data:`SHARED_LIMIT` bytes of shared memory.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(lau.kernel, InterpretedFunction):
        raise LaunchError("compiling PTX needs Triton's compiler, and TRITON_INTERPRET=1 makes it interpret the "
                          "kernels instead: unset TRITON_INTERPRET")
    options: dict[str, Any] = {"num_warps": lau.num_warps}
    if lau.num_stages is not None:
        options["num_stages"] = lau.num_stages
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    src = triton.compiler.ASTSource(fn=lau.kernel, signature=lau.signature(), constexprs=dict(lau.constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    meta = compiled.metadata
    where = f"{lau.plugin.name} ({lau.dtype}, sm_{cc})"
    if getattr(meta, "global_scratch_size", 0):
        raise LaunchError(f"{where}: the kernel needs {meta.global_scratch_size} bytes of global scratch memory, "
                          "which a TensorRT plugin launch does not provide")
    if getattr(meta, "num_ctas", 1) != 1:
        raise LaunchError(f"{where}: the kernel needs clusters of {meta.num_ctas} CTAs; TensorRT launches one")
    if meta.shared > SHARED_LIMIT:
        raise SharedMemoryError(f"{where}: the kernel needs {meta.shared} bytes of shared memory, more than the "
                          f"{SHARED_LIMIT} a launch gets without opting in")
    ptx = compiled.asm["ptx"]
    entry = ptx[ptx.index(".entry"):]
    return CompiledKernel(
        name=meta.name, ptx=ptx, block_x=meta.num_warps * 32, shared=meta.shared,
        ptx_version=re.search(r"^\.version (\S+)", ptx, re.MULTILINE).group(1),
        target=re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1),
        param_types=tuple(re.findall(r"\.param\s+\.(\w+)", entry[:entry.index(")")])))


def launch_for(op: str, inputs: Sequence[Any], attributes: Mapping[str, str] | None = None, *,
               interpreted: bool = False) -> Launch:
    """The launch that runs these tensors (checked against the op spec first, routed as int32), its sizes fixed
    to theirs."""
    import torch

    from ham_export.ops.spec import dtype_name

    plugin = PLUGINS[op]
    dims = plugin.op.check(inputs, attributes, values=False, bool_dtype=torch.int32, prefix=plugin.name)
    dtype = dtype_name(inputs[first_float_input(plugin)].dtype)
    return launch(op, dtype, {letter: dims.get(letter) for letter in "KVC"}, attributes, interpreted=interpreted)


def compile_fitting(op: str, dtype: str, sizes: Mapping[str, int | None], attributes: Mapping[str, str] | None,
                    cc: int, ptx_version: int | None = None) -> tuple[Launch, CompiledKernel]:
    """The first of the op's configurations that compiles within :data:`SHARED_LIMIT`, and its PTX."""
    refused = []
    for config in range(configs(op)):
        lau = launch(op, dtype, sizes, attributes, config=config)
        try:
            return lau, compile_ptx(lau, cc, ptx_version)
        except SharedMemoryError as e:
            refused.append(str(e))
    raise LaunchError(f"no configuration of {PLUGINS[op].name} fits: " + "; ".join(refused))


__all__ = ["TARGETS", "CompiledKernel", "Launch", "LaunchError", "SharedMemoryError", "compile_fitting", "compile_ptx",
           "configs", "launch", "launch_for", "sizes_of"]
