"""Host-side input checks shared by the kernel modules, run before any launch.

Each check raises ``ValueError`` with a message that names the argument, what was expected and what was given.
``named`` maps argument names to the values passed, in the order they are checked; an expectation for a name that
``named`` lacks (an optional argument left out) is skipped.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def shapes_of(named: dict, names: tuple[str, ...]) -> str:
    """``"q (1, 2, 1, 16), v (1, 2, 1, 8)"``: the shapes of ``names``, for a message."""
    return ", ".join(f"{name} {tuple(named[name].shape)}" for name in names)


def tensors(named: dict) -> None:
    """Every value is a ``torch.Tensor``, and all are on one device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")


def ndims(named: dict, expected: dict[str, int]) -> None:
    """Each tensor has its expected number of dimensions."""
    for name, ndim in expected.items():
        if name in named and named[name].dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(named[name].shape)}")


def shapes(named: dict, expected: dict[str, tuple[int, ...]], sources: tuple[str, ...]) -> None:
    """Each tensor has its expected shape, derived from the tensors named in ``sources`` (quoted in the message)."""
    for name, shape in expected.items():
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from {shapes_of(named, sources)}), got "
                             f"{tuple(named[name].shape)}")


def dtypes(named: dict, expected: dict[str, torch.dtype | tuple[torch.dtype, ...] | str]) -> None:
    """Each tensor has an allowed dtype: exactly a ``torch.dtype``, one of a tuple of them, or the dtype of the
    argument a ``str`` names (checked in the order given, so name that argument first)."""
    for name, want in expected.items():
        if name not in named:
            continue
        got = named[name].dtype
        if isinstance(want, str):
            if got != named[want].dtype:
                raise ValueError(f"{name} must have {want}'s dtype {named[want].dtype}, got {got}")
        elif isinstance(want, torch.dtype):
            if got != want:
                raise ValueError(f"{name} must be {want}, got {got}")
        elif got not in want:
            raise ValueError(f"{name} must be one of {want}, got {got}")


def nonempty(named: dict, what: str, sizes: tuple[int, ...], sources: tuple[str, ...]) -> None:
    """No size is 0; ``what`` names the sizes (e.g. ``"batch, heads or head dims"``), ``sources`` the tensors whose
    shapes the message quotes."""
    if 0 in sizes:
        raise ValueError(f"empty {what} are not supported: {shapes_of(named, sources)}")


def attention_args(q, k_cache, v_cache, length, k, v, routed, scale, one_token: bool) -> None:
    """The arguments of ``reference.cache_attention``, as both attention kernels take them (``one_token``: T = 1,
    the decode kernel)."""
    named = dict(q=q, k_cache=k_cache, v_cache=v_cache, length=length, k=k, v=v, routed=routed, scale=scale)
    tensors(named)
    ndims(named, dict(q=4, k_cache=4, v_cache=4, length=1, k=4, v=4, routed=2, scale=1))
    b, h, t, kd = q.shape
    c, vd = k_cache.shape[2], v_cache.shape[3]
    if one_token and t != 1:
        raise ValueError(f"cache_attention_decode handles one new token (T = 1); q has shape {tuple(q.shape)}")
    shapes(named, dict(k_cache=(b, h, c, kd), v_cache=(b, h, c, vd), length=(b,), k=(b, h, t, kd), v=(b, h, t, vd),
                       routed=(b, t), scale=(h,)), ("q", "k_cache", "v_cache"))
    dtypes(named, dict(q=FLOAT_DTYPES, k_cache="q", v_cache="q", k="q", v="q", scale=FLOAT_DTYPES,
                       length=torch.int64, routed=torch.bool))
    nonempty(named, "batch, heads, tokens or head dims", (b, h, t, kd, vd), ("q", "v_cache"))
