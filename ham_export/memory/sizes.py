"""Byte counts of a HAM model's weights and decoding state, per dtype.

Per sequence and layer, decoding holds a fixed part (the GDN state [H, K, V], the conv tail [W-1, D] and the cache
length, an int64) and a part that grows with the routed tokens (one key [H, K] and one value [H, V] per cached
token). These are exact sizes of the tensors in :class:`ham_export.core.model.LayerState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..core.config import HAMConfig
from ..errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LENGTH_BYTES = 8  # the int64 cache length of a layer


def dtype_bytes(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def fixed_state_bytes_per_layer(cfg: HAMConfig, dtype: str) -> int:
    """GDN state + conv tail + cache length of one layer for one sequence."""
    elements = cfg.n_heads * cfg.head_dim * cfg.head_dim_v + (cfg.conv_width - 1) * cfg.qkv_channels
    return elements * dtype_bytes(dtype) + LENGTH_BYTES


def kv_bytes_per_token_per_layer(cfg: HAMConfig, dtype: str) -> int:
    """One cached token's key and value in one layer."""
    return cfg.n_heads * (cfg.head_dim + cfg.head_dim_v) * dtype_bytes(dtype)


def weight_bytes(num_parameters: int, dtype: str) -> int:
    return num_parameters * dtype_bytes(dtype)


def byte_table(cfg: HAMConfig, num_parameters: int) -> dict[str, dict[str, int]]:
    """Per dtype: weights, fixed state per sequence and KV bytes per cached token (per layer and all layers)."""
    return {
        name: {
            "weights": weight_bytes(num_parameters, name),
            "fixed_state_per_sequence": cfg.n_layers * fixed_state_bytes_per_layer(cfg, name),
            "fixed_state_per_sequence_per_layer": fixed_state_bytes_per_layer(cfg, name),
            "kv_per_cached_token": cfg.n_layers * kv_bytes_per_token_per_layer(cfg, name),
            "kv_per_cached_token_per_layer": kv_bytes_per_token_per_layer(cfg, name),
        }
        for name in DTYPES
    }


# -- the memory model: per layer and in total, for a batch, a capacity and a dtype -------------------------------

def score_bytes_per_token_per_layer(dtype: str) -> int:
    """One cached token's router score (``score_cache``) in one layer."""
    return dtype_bytes(dtype)


def cache_bytes_per_token_per_layer(cfg: HAMConfig, dtype: str) -> int:
    """Everything one cache entry costs in one layer: key, value and score."""
    return kv_bytes_per_token_per_layer(cfg, dtype) + score_bytes_per_token_per_layer(dtype)


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of one layer's decoding state for a batch, field by field as in
    :class:`ham_export.core.model.LayerState`."""

    ssm: int
    conv: int
    k_cache: int
    v_cache: int
    score_cache: int
    length: int

    @property
    def fixed(self) -> int:
        """The part that does not depend on the capacity: GDN state, conv tail, cache length."""
        return self.ssm + self.conv + self.length

    @property
    def cache(self) -> int:
        return self.k_cache + self.v_cache + self.score_cache

    @property
    def total(self) -> int:
        return self.fixed + self.cache

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "fixed": self.fixed, "cache": self.cache, "total": self.total}


def layer_state_bytes(cfg: HAMConfig, batch: int, capacity: int, dtype: str) -> LayerBytes:
    """Exact bytes of the tensors of one layer's state (what ``init_state`` and the exported programs allocate)."""
    item = dtype_bytes(dtype)
    return LayerBytes(
        ssm=batch * cfg.n_heads * cfg.head_dim * cfg.head_dim_v * item,
        conv=batch * (cfg.conv_width - 1) * cfg.qkv_channels * item,
        k_cache=batch * cfg.n_heads * capacity * cfg.head_dim * item,
        v_cache=batch * cfg.n_heads * capacity * cfg.head_dim_v * item,
        score_cache=batch * capacity * item,
        length=batch * LENGTH_BYTES,
    )


def step_activation_bytes(cfg: HAMConfig, batch: int, capacity: int, dtype: str) -> int:
    """An estimate of one decode step's live activations: the attention weights over the cache of one layer
    [B, H, C], and the per-token vectors of one block (qkv, MLP, logits). Small next to the state."""
    per_token = cfg.qkv_channels + 3 * cfg.mlp_hidden + 4 * cfg.d_model + cfg.vocab_size
    return batch * (cfg.n_heads * capacity + per_token) * dtype_bytes(dtype)


def ort_decode_workspace_bytes(cfg: HAMConfig, batch: int, capacity: int, dtype: str,
                               shared_caches: bool = True) -> int:
    """The transient memory of one decode step of :class:`ham_export.backends.onnxruntime.OrtRunner`, over the state
    it holds.

    With ``shared_caches`` (custom or standard ops under the drop policy) each cache is bound as both input and
    output and written in place, so a step adds only its activations; otherwise the step's cache outputs are new
    tensors beside its inputs, a second copy of every cache.
    """
    cache = 0 if shared_caches else cfg.n_layers * layer_state_bytes(cfg, batch, capacity, dtype).cache
    return cache + step_activation_bytes(cfg, batch, capacity, dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for one configuration: per layer and in total. ``kv_bytes`` is the allocated cache (capacity C);
    ``kv_expected_bytes`` what a cache of exactly the expected fill would hold."""

    batch: int
    capacity: int
    dtype: str
    per_layer: list[LayerBytes]
    weights_bytes: int
    kv_expected_bytes: int
    workspace_bytes: int

    @property
    def state_bytes(self) -> int:
        """The fixed state of all layers: GDN states, conv tails, cache lengths."""
        return sum(layer.fixed for layer in self.per_layer)

    @property
    def kv_bytes(self) -> int:
        """Allocated cache of all layers: keys, values and scores at capacity."""
        return sum(layer.cache for layer in self.per_layer)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.state_bytes + self.kv_bytes + self.workspace_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "capacity": self.capacity, "dtype": self.dtype,
                "weights_bytes": self.weights_bytes, "state_bytes": self.state_bytes, "kv_bytes": self.kv_bytes,
                "kv_expected_bytes": self.kv_expected_bytes, "workspace_bytes": self.workspace_bytes,
                "total_bytes": self.total_bytes, "per_layer": [layer.to_dict() for layer in self.per_layer]}


def estimate(cfg: HAMConfig, num_parameters: int, batch: int, capacity: int, dtype: str,
             expected_entries_per_layer: Sequence[float] | None = None, workspace: bool = True,
             shared_caches: bool = True) -> MemoryEstimate:
    """The memory of decoding ``batch`` sequences with a cache of ``capacity`` entries per layer, in ``dtype``.

    ``expected_entries_per_layer``: the expected cache fill per layer (for ``kv_expected_bytes``; default: full).
    ``workspace``: add the ONNX Runtime runner's decode workspace (:func:`ort_decode_workspace_bytes`, with
    ``shared_caches``: the default export, custom ops under the drop policy, updates the caches in place)."""
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch < 1 or capacity < 0:
        raise InputError(f"need batch >= 1 and capacity >= 0, got batch={batch}, capacity={capacity}")
    expected = list(expected_entries_per_layer) if expected_entries_per_layer is not None else \
        [capacity] * cfg.n_layers
    per_token = cache_bytes_per_token_per_layer(cfg, dtype)
    return MemoryEstimate(
        batch=batch, capacity=capacity, dtype=dtype,
        per_layer=[layer_state_bytes(cfg, batch, capacity, dtype) for _ in range(cfg.n_layers)],
        weights_bytes=weight_bytes(num_parameters, dtype),
        kv_expected_bytes=round(batch * per_token * sum(min(e, capacity) for e in expected)),
        workspace_bytes=ort_decode_workspace_bytes(cfg, batch, capacity, dtype, shared_caches) if workspace else 0,
    )


def largest_capacity(cfg: HAMConfig, num_parameters: int, batch: int, dtype: str, budget: int,
                     context: int) -> int:
    """The largest capacity (<= context) whose :func:`estimate` total fits ``budget``; 0 when none does."""
    lo, hi = 0, context
    if estimate(cfg, num_parameters, batch, 1, dtype).total_bytes > budget:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(cfg, num_parameters, batch, mid, dtype).total_bytes <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
