"""Byte counts of a HAM model's weights and decoding state, per dtype.

Per sequence and layer, decoding holds a fixed part (the GDN state [H, K, V], the conv tail [W-1, D] and the cache
length, an int64) and a part that grows with the routed tokens (one key [H, K] and one value [H, V] per cached
token). These are exact sizes of the tensors in :class:`ham_export.model.LayerState`.
"""

from __future__ import annotations

import torch

from .config import HAMConfig

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
