"""Host-side input checks of the kernel launchers, run before any launch.

A launcher of a ``ham`` op checks its inputs with the op's spec (:func:`op_inputs`, which is
:meth:`ham_export.ops.spec.OpSpec.check`, the check of every implementation), plus what the kernel adds (one device).
The helpers below serve the kernels that are not ops (the GDN decode step, the fused decode step): each raises
``ValueError`` with a message that names the argument, what was expected and what was given. ``named`` maps argument
names to the values passed, in the order they are checked; an expectation for a name that ``named`` lacks (an
optional argument left out) is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ham_export.errors import InputError
from ham_export.ops.spec import OpSpec


class KernelInputError(InputError):
    """Inputs a kernel cannot take (an InputError, so a ValueError)."""


def op_inputs(spec: OpSpec, inputs: Sequence, attributes: Mapping[str, str] | None = None, *,
              values: bool | None = None) -> dict:
    """The op's preconditions (its spec) and one device for every tensor; returns the size of every shape letter.
    ``values``: check the lengths on the host (default: when they live on the CPU, see ``OpSpec.check``)."""
    dims = spec.check(inputs, attributes, values=values)
    devices = {t.device for t in inputs}
    if len(devices) > 1:
        raise KernelInputError(f"{spec.torch_name}: all inputs must be on one device, got "
                               f"{sorted(str(d) for d in devices)}")
    return dims


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
