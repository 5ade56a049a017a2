"""Arguments of each ham op for the dispatch tests: CPU tensors, NaN-poisoned cache tails, both T forms.

A module of its own (importing no kernel) so that the GPU test's child process can build the same cases without the
interpreter that the parent test module turns on.
"""

from __future__ import annotations

import torch

from ham_export import reference as ref


def attention_args(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, c, k = 2, 2, 24, 16
    k_cache, v_cache = torch.randn(b, h, c, k, generator=g), torch.randn(b, h, c, k, generator=g)
    length = torch.tensor([c, 7])
    k_cache[1, :, 7:] = float("nan")
    v_cache[1, :, 7:] = float("nan")
    q, kn, vn = (torch.randn(b, h, t, k, generator=g) for _ in range(3))
    routed = torch.rand(b, t, generator=g) > 0.4
    return q, k_cache, v_cache, length, kn, vn, routed, torch.tensor([2.0, 3.0])


def append_args(t: int, policy: str):
    _, k_cache, v_cache, length, kn, vn, routed, _ = attention_args(t, seed=1)
    score_cache = torch.rand(2, 24)
    score_cache[1, 7:] = float("nan")
    return k_cache, v_cache, score_cache, length, kn, vn, torch.rand(2, t), routed, policy


def gdn_args(t: int):
    g = torch.Generator().manual_seed(2)
    b, h, k = 1, 2, 16
    q, kk = (ref.l2_normalize(torch.randn(b, t, h, k, generator=g)) for _ in range(2))
    v = torch.randn(b, t, h, k, generator=g)
    return q, kk, v, -torch.rand(b, t, h, generator=g), torch.rand(b, t, h, generator=g), torch.randn(b, h, k, k)


CASES = [
    ("cache_attention", attention_args(1), "kernels.cache_attention", "cache_attention_decode"),
    ("cache_attention", attention_args(5), "kernels.prefill_attention", "prefill_attention"),
    ("cache_append", append_args(1, "drop"), "kernels.cache_append", "cache_append"),
    ("cache_append", append_args(9, "evict"), "kernels.cache_append", "cache_append"),
    ("gdn_prefill", gdn_args(7), "kernels.gdn", "gdn_chunked"),
]
