"""Inputs of the HAM ops for every op test: one builder per op, in spec order, caches NaN past their length.

A cache entry at or past ``length`` holds NaN (scores too), so an implementation that reads there shows at once, and
a comparison with ``equal_nan`` checks that it left them as they came. Every builder returns a list of torch tensors
in the order of the op's spec (:mod:`ham_export.ops.spec`), float inputs in ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ham_export.ops import reference as ref
from ham_export.ops.spec import CACHE_APPEND, CACHE_ATTENTION, GDN_PREFILL, OpSpec


def poison(x: torch.Tensor, length: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` with NaN at positions >= length[b] along ``axis`` (a cache never written there). Lengths outside
    [0, C] poison nothing below 0 and everything past C."""
    pos = torch.arange(x.shape[axis]).view(*([1] * axis), -1, *([1] * (x.dim() - axis - 1)))
    lim = length.view(-1, *([1] * (x.dim() - 1)))
    return x.masked_fill(pos >= lim, float("nan"))


def _cast(args: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [x.to(dtype) if x.is_floating_point() else x for x in args]


def attention(b: int, h: int, t: int, c: int, k: int = 8, v: int = 6, lengths=None, routed_p: float = 0.6,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """CacheAttention(q, k_cache, v_cache, length, k, v, routed, scale): unit queries and keys, NaN cache tails."""
    gen = torch.Generator().manual_seed(seed)
    length = (torch.tensor(lengths, dtype=torch.int64) if lengths is not None
              else torch.randint(0, c + 1, (b,), generator=gen))
    q = ref.l2_normalize(torch.randn(b, h, t, k, generator=gen))
    kn = ref.l2_normalize(torch.randn(b, h, t, k, generator=gen))
    vn = torch.randn(b, h, t, v, generator=gen)
    k_cache = poison(ref.l2_normalize(torch.randn(b, h, c, k, generator=gen)), length, 2)
    v_cache = poison(torch.randn(b, h, c, v, generator=gen), length, 2)
    routed = torch.rand(b, t, generator=gen) < routed_p
    scale = 0.5 + 7.5 * torch.rand(h, generator=gen)
    return _cast([q, k_cache, v_cache, length, kn, vn, routed, scale], dtype)


def append(b: int, h: int, t: int, c: int, k: int = 8, v: int = 6, lengths=None, routed_p: float = 0.6,
           dtype: torch.dtype = torch.float32, seed: int = 0, ties: bool = False) -> list[torch.Tensor]:
    """CacheAppend(k_cache, v_cache, score_cache, length, k, v, score, routed); ``ties``: scores on a coarse grid,
    so that evictions meet equal scores."""
    gen = torch.Generator().manual_seed(seed)
    length = (torch.tensor(lengths, dtype=torch.int64) if lengths is not None
              else torch.randint(0, c + 1, (b,), generator=gen))

    def scores(*shape):
        return torch.randint(0, 4, shape, generator=gen) / 4 if ties else torch.rand(*shape, generator=gen)

    k_cache = poison(torch.randn(b, h, c, k, generator=gen), length, 2)
    v_cache = poison(torch.randn(b, h, c, v, generator=gen), length, 2)
    score_cache = poison(scores(b, c), length, 1)
    kn, vn = torch.randn(b, h, t, k, generator=gen), torch.randn(b, h, t, v, generator=gen)
    routed = torch.rand(b, t, generator=gen) < routed_p
    return _cast([k_cache, v_cache, score_cache, length, kn, vn, scores(b, t), routed], dtype)


def near_ties() -> list[torch.Tensor]:
    """Full caches whose scores differ by a few ulps (one key on the eviction grid), and saturated scores.

    Row 0: the cache holds 0.5, 0.2 + 1 ulp, 0.2, 0.2 - 1 ulp; 0.2 + 2 ulps ties the lowest key and stays out, 0.3
    evicts slot 1 (the first of the tied keys, not the raw minimum at slot 3), 6e-8 stays out. Row 1: 0, 0, 2, 1;
    2^-24 (a saturated cosine score computed as 1 - (1 - 2^-24)) ties 0 and stays out, 1 - 2^-24 evicts slot 0 and
    2 evicts slot 1. Expected score caches: :data:`NEAR_TIES_AFTER`."""
    inputs = append(2, 1, 3, 4, k=2, v=2, lengths=[4, 4], routed_p=1.0, seed=6)
    point2 = torch.tensor(0.2)
    up, down = torch.nextafter(point2, torch.tensor(1.0)), torch.nextafter(point2, torch.tensor(0.0))
    up2 = torch.nextafter(up, torch.tensor(1.0))
    tiny, almost_one = torch.tensor(2.0 ** -24), torch.tensor(1.0 - 2.0 ** -24)
    inputs[2] = torch.stack([torch.stack([torch.tensor(0.5), up, point2, down]), torch.tensor([0.0, 0.0, 2.0, 1.0])])
    inputs[6] = torch.stack([torch.stack([up2, torch.tensor(0.3), tiny]),
                             torch.stack([tiny, almost_one, torch.tensor(2.0)])])
    return inputs


NEAR_TIES_AFTER = {"evict": [[0.5, 0.3, 0.2, float(torch.nextafter(torch.tensor(0.2), torch.tensor(0.0)))],
                             [1.0 - 2.0 ** -24, 2.0, 2.0, 1.0]]}


def gdn(b: int, t: int, h: int, k: int = 8, v: int = 6, dtype: torch.dtype = torch.float32, seed: int = 0
        ) -> list[torch.Tensor]:
    """GdnPrefill(q, k, v, g, beta, state): unit q and k, decays in (0.5, 1]."""
    gen = torch.Generator().manual_seed(seed)
    q = ref.l2_normalize(torch.randn(b, t, h, k, generator=gen))
    kk = ref.l2_normalize(torch.randn(b, t, h, k, generator=gen))
    vv = torch.randn(b, t, h, v, generator=gen)
    g = -0.7 * torch.rand(b, t, h, generator=gen)
    beta = torch.rand(b, t, h, generator=gen)
    state = torch.randn(b, h, k, v, generator=gen)
    return _cast([q, kk, vv, g, beta, state], dtype)


@dataclass(frozen=True)
class Case:
    """One call of an op: its inputs (spec order), attributes and a name for the test id."""

    spec: OpSpec
    name: str
    inputs: list[torch.Tensor] = field(compare=False)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        return self.spec.check(self.inputs, self.attributes, values=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[0].dtype

    def __str__(self) -> str:
        return self.name


def attention_cases() -> list[Case]:
    """Decode (T = 1) and prompts; empty, partial, full and mixed caches; nothing routed; large logits; fp16."""
    cases = []
    for (b, h, t, c), kind in [((1, 1, 1, 4), "empty"), ((2, 3, 1, 8), "mixed"), ((2, 3, 1, 70), "partial"),
                               ((3, 2, 5, 6), "full"), ((2, 4, 9, 16), "mixed"), ((2, 2, 40, 33), "partial")]:
        lengths = {"empty": [0] * b, "full": [c] * b, "partial": [c // 2] * b, "mixed": None}[kind]
        cases.append(Case(CACHE_ATTENTION, f"B{b}-H{h}-T{t}-C{c}-{kind}", attention(b, h, t, c, lengths=lengths,
                                                                                    seed=b + t + c)))
    cases.append(Case(CACHE_ATTENTION, "nothing-routed", attention(2, 2, 3, 4, lengths=[0, 2], routed_p=0.0)))
    big = attention(1, 2, 4, 8, k=16, v=4, lengths=[5], seed=1)
    big[0] = big[0] * 40.0  # logits in the hundreds: exp overflows without the max subtraction
    cases.append(Case(CACHE_ATTENTION, "large-logits", big))
    for t in (1, 4):
        cases.append(Case(CACHE_ATTENTION, f"fp16-T{t}", attention(2, 3, t, 8, lengths=[0, 5], dtype=torch.float16,
                                                                   seed=2)))
        cases.append(Case(CACHE_ATTENTION, f"bf16-T{t}", attention(2, 3, t, 8, lengths=[3, 8], dtype=torch.bfloat16,
                                                                   seed=3)))
    return cases


def append_cases() -> list[Case]:
    """Both policies; empty, partial, full and overflowing rows; decode (T = 1) and prompts; ties; fp16."""
    cases = []
    for policy in ("drop", "evict"):
        for (b, h, t, c), kind in [((1, 1, 1, 4), "empty"), ((2, 3, 1, 8), "full"), ((3, 2, 5, 6), "mixed"),
                                   ((2, 2, 9, 4), "partial"), ((3, 2, 7, 5), "mixed-ties")]:
            lengths = {"empty": [0] * b, "full": [c] * b, "partial": [c // 2] * b}.get(kind)
            cases.append(Case(CACHE_APPEND, f"{policy}-B{b}-H{h}-T{t}-C{c}-{kind}",
                              append(b, h, t, c, lengths=lengths, seed=b * 100 + t * 10 + c,
                                     ties=kind.endswith("ties"), routed_p=0.8), {"policy": policy}))
        overflow = append(2, 2, 6, 4, k=3, v=3, lengths=[3, 4], routed_p=1.0, seed=3)
        overflow[6] = torch.tensor([[0.1, 0.9, 0.2, 0.95, 0.3, 0.8], [0.0, 2.0, 2.0, 0.5, 3.0, 0.1]])
        cases.append(Case(CACHE_APPEND, f"{policy}-overflow", overflow, {"policy": policy}))
        ties = append(1, 1, 2, 3, k=2, v=2, lengths=[3], routed_p=1.0, seed=4)
        ties[2] = torch.tensor([[0.5, 0.2, 0.2]])
        ties[6] = torch.tensor([[0.2, 0.3]])  # the first ties the lowest (stays out), the second evicts slot 1
        cases.append(Case(CACHE_APPEND, f"{policy}-first-lowest-slot", ties, {"policy": policy}))
        cases.append(Case(CACHE_APPEND, f"{policy}-near-ties", near_ties(), {"policy": policy}))
        for dtype in (torch.float16, torch.bfloat16):
            cases.append(Case(CACHE_APPEND, f"{policy}-{str(dtype)[6:]}",
                              append(2, 2, 5, 4, lengths=[2, 4], routed_p=0.9, dtype=dtype, seed=5),
                              {"policy": policy}))
    return cases


def gdn_cases() -> list[Case]:
    """One token and prompts (a non-multiple of every chunk size, longer than one chunk), odd widths, fp16."""
    cases = [Case(GDN_PREFILL, f"B{b}-T{t}-H{h}-K{k}-V{v}", gdn(b, t, h, k, v, seed=t))
             for b, t, h, k, v in [(1, 1, 1, 4, 4), (2, 1, 3, 8, 6), (2, 7, 2, 8, 8), (3, 33, 2, 16, 8),
                                   (1, 70, 1, 5, 3)]]
    cases.append(Case(GDN_PREFILL, "fp16", gdn(2, 9, 2, 8, 8, dtype=torch.float16, seed=9)))
    cases.append(Case(GDN_PREFILL, "bf16", gdn(2, 9, 2, 8, 8, dtype=torch.bfloat16, seed=10)))
    return cases


CASES = {"cache_attention": attention_cases, "cache_append": append_cases, "gdn_prefill": gdn_cases}
BUILDERS = {"cache_attention": attention, "cache_append": append, "gdn_prefill": gdn}


def dispatch_cases() -> list[tuple[str, list[torch.Tensor], tuple[str, ...], str]]:
    """(op, inputs, attributes, the Triton ``module:function`` that must run it) for each form of each ``ham`` op:
    the dispatch tests, and their GPU child process (which must not import the interpreter's settings)."""
    return [
        ("cache_attention", attention(2, 2, 1, 24, k=16, v=16, lengths=[24, 7]), (),
         "cache_attention:cache_attention_decode"),
        ("cache_attention", attention(2, 2, 5, 24, k=16, v=16, lengths=[24, 7]), (),
         "prefill_attention:prefill_attention"),
        ("cache_append", append(2, 2, 1, 24, lengths=[24, 7]), ("drop",), "cache_append:cache_append"),
        ("cache_append", append(2, 2, 9, 24, lengths=[20, 7]), ("evict",), "cache_append:cache_append"),
        ("cache_append_", append(2, 2, 3, 24, lengths=[22, 7]), ("evict",), "cache_append:cache_append_"),
        ("gdn_prefill", gdn(1, 7, 2, 16, 16), (), "gdn:gdn_chunked"),
    ]
