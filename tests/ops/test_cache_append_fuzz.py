"""Fuzz of every cache-append implementation: random shapes, lengths, routes, scores (ties too) and policies, a
quarter of the calls with a length outside [0, C]. Each call either equals the reference bit for bit or, for a bad
length, is refused (an error on the host, or the row flagged in the kernel) with that row left as it was.

In-place implementations write into views of guarded buffers: 64 sentinel elements before and after each cache
(and the length), which must come back untouched, so a write past the cache's ends shows. Past ``length``, the
cache tails hold NaN and must come back as they came (the comparison is exact, NaN included).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from ham_export.ops import reference as ref

from .conftest import available
from .implementations import IMPLEMENTATIONS, ImplError
from .inputs import append

ROUNDS = 30
GUARD = 64
SENTINEL = {torch.float32: 12345.0, torch.int64: 777_777}


def cases(rounds: int = ROUNDS, seed: int = 2024, one_token: bool = False):
    """The same random calls for every implementation (small head sets keep the TIR compiles few); ``one_token``:
    T = 1 in every call, for a decode form."""
    rng = random.Random(seed)
    for i in range(rounds):
        b, h, c, t = rng.randint(1, 3), rng.choice([1, 2]), rng.randint(1, 6), rng.randint(1, 6)
        t = 1 if one_token else t
        k, v = rng.choice([(2, 3), (3, 2)])
        lengths = [rng.randint(0, c) for _ in range(b)]
        bad_row = None
        if rng.random() < 0.25:
            bad_row = rng.randrange(b)
            lengths[bad_row] = rng.choice([rng.randint(-5, -1), rng.randint(c + 1, c + 5)])
        policy = rng.choice(["drop", "evict"])
        inputs = append(b, h, t, c, k, v, lengths=[min(max(n, 0), c) for n in lengths],
                        routed_p=rng.choice([0.3, 0.8, 1.0]), seed=seed + i, ties=rng.random() < 0.5)
        inputs[3] = torch.tensor(lengths, dtype=torch.int64)
        yield i, inputs, {"policy": policy}, bad_row


def guarded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): ``x`` copied into the middle of a buffer with GUARD sentinel elements on each side."""
    n = math.prod(x.shape)
    buffer = torch.full((GUARD + n + GUARD,), SENTINEL[x.dtype], dtype=x.dtype)
    view = buffer[GUARD: GUARD + n].view(x.shape)
    view.copy_(x)
    return buffer, view


@pytest.mark.parametrize("impl", IMPLEMENTATIONS["cache_append"], ids=str)
def test_random_calls(impl):
    available(impl)
    for i, inputs, attributes, bad_row in cases(one_token=impl.accepts({"T": 2}) is not None):
        given = [x.clone() for x in inputs]
        where = f"call {i} (lengths {inputs[3].tolist()}, C {inputs[0].shape[2]}, {attributes['policy']})"
        buffers = None
        if impl.in_place:
            pairs = [guarded(x) for x in inputs[:4]]
            buffers = [p[0] for p in pairs]
            inputs = [p[1] for p in pairs] + inputs[4:]
        try:
            if impl.in_place:
                overflow = impl.write(inputs, attributes, host_check=False)
                got = [*inputs[:4], overflow]
            else:
                got = impl.run(inputs, attributes, host_check=False)
        except ImplError as exc:
            assert bad_row is not None and not impl.refuses_on_device, f"{where}: refused: {exc}"
            assert "outside [0, C]" in str(exc), f"{where}: {exc}"
            got = None
        if buffers is not None:
            for buffer in buffers:
                for side in (buffer[:GUARD], buffer[-GUARD:]):
                    assert bool((side == SENTINEL[buffer.dtype]).all()), f"{where}: written past the cache"
        if bad_row is None:
            want = ref.cache_append(*given, attributes["policy"])
            for name, g, w in zip(("k_cache", "v_cache", "score_cache", "length", "overflow"), got, want,
                                  strict=True):
                torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True, msg=f"{where}: {name}")
            continue
        if got is None:  # refused on the host: nothing written
            for x, g in zip(inputs[:4], given[:4], strict=True):
                torch.testing.assert_close(x, g, atol=0, rtol=0, equal_nan=True, msg=where)
            continue
        # refused in the kernel: the row flagged and left as it was
        assert impl.refuses_on_device, f"{where}: a bad length was accepted"
        assert got[4][bad_row] == -1 and got[3][bad_row] == given[3][bad_row], where
        for g, x in zip(got[:3], given[:3], strict=False):
            torch.testing.assert_close(g[bad_row], x[bad_row], atol=0, rtol=0, equal_nan=True, msg=where)


def test_the_fuzz_meets_every_kind_of_call():
    """The cases hold valid and bad lengths of both signs, both policies, and overflowing rows."""
    calls = list(cases())
    assert sum(bad is not None for *_, bad in calls) >= 4
    signs = {int(inputs[3][bad]) < 0 for _, inputs, _, bad in calls if bad is not None}
    assert signs == {True, False}
    assert {a["policy"] for _, _, a, _ in calls} == {"drop", "evict"}
    assert any(int(ref.cache_append(*inputs, a["policy"])[4].max()) > 0
               for _, inputs, a, bad in calls if bad is None)
