"""The HAM language model in plain PyTorch (the fp32 reference).

A HAM layer runs a Gated DeltaNet (GDN) over the sequence and keeps in a KV cache only the tokens the GDN predicts
badly; softmax attention reads that cache, and head-wise gates mix the two read-outs. Each layer comes in three
forms that agree with each other (see ``tests/model/test_model.py``):

- :meth:`HAMLayer.forward`: the parallel form for training (chunked GDN, attention masked to routed keys);
- :meth:`HAMLayer.prefill`: a prompt from an explicit state (the ``ham`` ops: GDN prefill, cache attention, cache
  append);
- :meth:`HAMLayer.step`: one token from an explicit state (recurrent GDN step, cache attention, cache append).

The prompt and decode forms return new state (what ``torch.export`` needs), or, with ``in_place=True``, write it
into the state they are given (``ham::cache_append_``: only the new cache entries are written), which is how a
runtime that keeps its state on a device runs them (the Triton runner).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CacheFullError, InputError
from ..ops import library as ops
from ..ops import reference as ref
from ..ops.spec import POLICIES as APPEND_POLICIES
from .config import HAMConfig

POLICIES = ("error", *APPEND_POLICIES)  # what a routed token does at a full cache; "error" is eager-only


class LayerState(NamedTuple):
    """The decoding state of one HAM layer for a batch of B sequences.

    ssm: [B, H, K, V] GDN state; conv: [B, W-1, D] last pre-conv rows; k_cache: [B, H, C, K];
    v_cache: [B, H, C, V]; score_cache: [B, C] router score of each entry; length: [B] int64 valid cache
    entries. C is the cache capacity.
    """

    ssm: torch.Tensor
    conv: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    score_cache: torch.Tensor
    length: torch.Tensor


class RouteInfo(NamedTuple):
    """Per layer, what the router did: score [B, T] (e or p), routed [B, T] bool (score >= tau), and in the
    prefill and step forms overflow [B] int64, the routed tokens that found the cache full."""

    score: torch.Tensor
    routed: torch.Tensor
    overflow: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ref.rms_norm(x, self.weight, self.eps)


class HAMLayer(nn.Module):
    """One HAM mixer: GDN + routed KV cache + softmax attention + gated combine.

    Its input is the block's pre-normed hidden state [B, T, d_model]; ``tau`` is a 0-dim tensor.
    """

    def __init__(self, cfg: HAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, dk, dv, d = cfg.n_heads, cfg.head_dim, cfg.head_dim_v, cfg.d_model
        self.qkv = nn.Linear(d, cfg.qkv_channels, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(cfg.qkv_channels, cfg.conv_width))
        self.beta_proj = nn.Linear(d, h, bias=False)
        self.decay_proj = nn.Linear(d, h, bias=False)
        self.A_log = nn.Parameter(torch.empty(h))
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.attn_scale = nn.Parameter(torch.full((h,), 8.0))
        self.gate_rnn = nn.Linear(d, h, bias=False)
        self.gate_kv = nn.Linear(d, h, bias=False)
        self.norm_rnn = RMSNorm(dv, cfg.norm_eps)
        self.norm_kv = RMSNorm(dv, cfg.norm_eps)
        self.out = nn.Linear(h * dv, d, bias=False)
        self.router = (nn.Sequential(nn.Linear(d, cfg.router_hidden), nn.SiLU(), nn.Linear(cfg.router_hidden, 1))
                       if cfg.router == "learned" else None)
        self._split = (h * dk, h * dk, h * dv)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.cfg.conv_width)
        self.conv_weight.uniform_(-bound, bound, generator=generator)
        h = self.cfg.n_heads
        self.A_log.copy_(torch.empty(h).uniform_(1.0, 16.0, generator=generator).log())
        dt = torch.empty(h).uniform_(math.log(1e-3), math.log(1e-1), generator=generator).exp()
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.attn_scale.fill_(8.0)

    # -- the pieces shared by the three forms -----------------------------------------------------------------

    def _project(self, x: torch.Tensor, conv_tail: torch.Tensor):
        """x [B, T, d] -> q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], new conv tail."""
        b, t, _ = x.shape
        h = self.cfg.n_heads
        mixed, new_tail = ref.causal_conv(self.qkv(x), conv_tail, self.conv_weight)
        q, k, v = F.silu(mixed).split(self._split, dim=-1)
        q = ref.l2_normalize(q.reshape(b, t, h, -1))
        k = ref.l2_normalize(k.reshape(b, t, h, -1))
        v = v.reshape(b, t, h, -1)
        beta = torch.sigmoid(self.beta_proj(x))
        g = -self.A_log.exp() * F.softplus(self.decay_proj(x) + self.dt_bias)
        return q, k, v, g, beta, new_tail

    def _score(self, x: torch.Tensor, vhat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The router's score [B, T]: min over heads of 1 - cos(vhat, v), or the learned router's p."""
        if self.router is None:
            # In fp32 whatever the working dtype: in fp16 the cosine's 1e-8 floor underflows and e(0, v) is NaN.
            return ref.surprise(vhat.float(), v.float()).amin(-1).to(x.dtype)
        return torch.sigmoid(self.router(x)).squeeze(-1)

    def _combine(self, x: torch.Tensor, o_rnn: torch.Tensor, o_kv: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], o_rnn and o_kv [B, T, H, V] -> [B, T, d]."""
        mixed = (torch.sigmoid(self.gate_rnn(x))[..., None] * self.norm_rnn(o_rnn)
                 + torch.sigmoid(self.gate_kv(x))[..., None] * self.norm_kv(o_kv))
        return self.out(mixed.flatten(2))

    def zero_conv_tail(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.cfg.conv_width - 1, self.cfg.qkv_channels, device=device, dtype=dtype)

    # -- the three forms --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, tau: torch.Tensor, chunk_size: int = 64) -> tuple[torch.Tensor, RouteInfo]:
        """Parallel form over whole sequences from an empty state: x [B, T, d] -> y [B, T, d], route info."""
        b, t, _ = x.shape
        cfg = self.cfg
        q, k, v, g, beta, _ = self._project(x, self.zero_conv_tail(b, x.device, x.dtype))
        state = x.new_zeros(b, cfg.n_heads, cfg.head_dim, cfg.head_dim_v)
        o_rnn, vhat, _ = ref.gdn_chunked(q, k, v, g, beta, state, chunk_size)
        score = self._score(x, vhat, v)
        routed = ref.route(score, tau.to(score.dtype))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril().expand(b, t, t)
        qh, kh, vh = (z.transpose(1, 2) for z in (q, k, v))
        if self.training and self.router is not None:
            # Straight-through: the value is the hard route, the gradient reaches the router through p.
            key_weight = routed.to(x.dtype) + score - score.detach()
            o_kv = ref.routed_attention(qh, kh, vh, causal, self.attn_scale, key_weight)
        else:
            o_kv = ref.routed_attention(qh, kh, vh, causal & routed[:, None, :], self.attn_scale)
        return self._combine(x, o_rnn, o_kv.transpose(1, 2)), RouteInfo(score, routed)

    def prefill(self, x: torch.Tensor, state: LayerState, tau: torch.Tensor, policy: str = "error",
                in_place: bool = False) -> tuple[torch.Tensor, LayerState, RouteInfo]:
        """Prompt form: x [B, T, d] continuing from ``state`` -> y [B, T, d], new state, route info."""
        return self._with_state(x, state, tau, policy, decode=False, in_place=in_place)

    def step(self, x: torch.Tensor, state: LayerState, tau: torch.Tensor, policy: str = "error",
             in_place: bool = False) -> tuple[torch.Tensor, LayerState, RouteInfo]:
        """Decode form: x [B, d], one token per sequence -> y [B, d], new state, route info ([B, 1])."""
        y, new_state, info = self._with_state(x[:, None], state, tau, policy, decode=True, in_place=in_place)
        return y[:, 0], new_state, info

    def _with_state(self, x, state: LayerState, tau, policy: str, decode: bool, in_place: bool
                    ) -> tuple[torch.Tensor, LayerState, RouteInfo]:
        """Within one call, attention sees the cache as it stood plus the call's routed tokens up to each query;
        the call's routed tokens are stored at its end, under ``policy`` when they do not fit. ``in_place`` writes
        the new state into ``state`` (the caches through ``ham::cache_append_``) and returns it."""
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if in_place and policy == "error":
            raise InputError("the in-place form needs an overflow policy (drop or evict): it cannot refuse a full "
                             "cache after writing it")
        q, k, v, g, beta, conv = self._project(x, state.conv)
        gdn = ref.gdn_recurrent if decode else ops.gdn_prefill  # one token: the plain step, standard ops
        o_rnn, vhat, ssm = gdn(q, k, v, g, beta, state.ssm)
        score = self._score(x, vhat, v)
        routed = ref.route(score, tau.to(score.dtype))
        qh, kh, vh = (z.transpose(1, 2) for z in (q, k, v))
        o_kv = ops.cache_attention(qh, state.k_cache, state.v_cache, state.length, kh, vh, routed, self.attn_scale)
        caches = (state.k_cache, state.v_cache, state.score_cache, state.length)
        append_policy = "drop" if policy == "error" else policy
        if in_place:
            overflow = ops.cache_append_(*caches, kh, vh, score, routed, append_policy)
            state.ssm.copy_(ssm)
            state.conv.copy_(conv)
            new_state = state
        else:
            *new_caches, overflow = ops.cache_append(*caches, kh, vh, score, routed, append_policy)
            new_state = LayerState(ssm, conv, *new_caches)
            if policy == "error" and bool((overflow > 0).any()):
                raise CacheFullError(
                    f"the KV cache is full: capacity {state.k_cache.shape[2]}, a sequence needs "
                    f"{int((state.length + routed.sum(1)).max())} entries; allocate a larger state or choose an "
                    f"overflow policy (drop, evict)")
        y = self._combine(x, o_rnn, o_kv.transpose(1, 2))
        return y, new_state, RouteInfo(score, routed, overflow)

    def init_state(self, batch: int, capacity: int, device=None, dtype=torch.float32,
                   fill: float = 0.0) -> LayerState:
        """An empty state; ``fill`` sets the unused cache entries (tests poison them with NaN)."""
        cfg = self.cfg
        h = cfg.n_heads
        return LayerState(
            ssm=torch.zeros(batch, h, cfg.head_dim, cfg.head_dim_v, device=device, dtype=dtype),
            conv=self.zero_conv_tail(batch, device, dtype),
            k_cache=torch.full((batch, h, capacity, cfg.head_dim), fill, device=device, dtype=dtype),
            v_cache=torch.full((batch, h, capacity, cfg.head_dim_v), fill, device=device, dtype=dtype),
            score_cache=torch.full((batch, capacity), fill, device=device, dtype=dtype),
            length=torch.zeros(batch, dtype=torch.int64, device=device),
        )


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class HAMBlock(nn.Module):
    """Pre-RMSNorm -> HAM mixer -> residual; pre-RMSNorm -> SwiGLU MLP -> residual."""

    def __init__(self, cfg: HAMConfig) -> None:
        super().__init__()
        self.norm_mixer = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = HAMLayer(cfg)
        self.norm_mlp = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)


class HAMLM(nn.Module):
    """A HAM language model: tied embedding, HAM blocks, final RMSNorm, LM head sharing the embedding.

    The calibrated thresholds live in ``cfg.thresholds``; every call can override them with one value for all
    layers or one per layer, without touching the weights.
    """

    def __init__(self, cfg: HAMConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(HAMBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_out = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("mixer.out", "mlp.down")) else 0.02
                module.weight.normal_(0.0, std, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=gen)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for block in self.blocks:
            block.mixer.reset_parameters(gen)

    @property
    def layers(self) -> list[HAMLayer]:
        return [block.mixer for block in self.blocks]

    def thresholds(self, override: float | Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """The per-layer thresholds [n_layers] (float32): the config's, or ``override`` (one value or one per layer)."""
        values = self.cfg.thresholds if override is None else override
        return resolve_thresholds(values, self.cfg.n_layers).to(self.embed.weight.device)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm_out(h), self.embed.weight)

    def _check_tokens(self, tokens: torch.Tensor, dims: int) -> None:
        if tokens.dim() != dims or tokens.dtype not in (torch.int32, torch.int64):
            raise InputError(f"tokens must be an integer tensor with {dims} dims, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise InputError(f"token ids must be in [0, {self.cfg.vocab_size})")

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding of checked or unchecked tokens: an id outside [0, vocab) embeds as NaN, so that its
        sequence's logits and state are NaN. The exported programs have no error channel, and a plain ``Gather``
        would read a negative id from the end of the table (ONNX) or out of bounds (compiled code)."""
        valid = (tokens >= 0) & (tokens < self.cfg.vocab_size)
        h = self.embed(tokens.clamp(0, self.cfg.vocab_size - 1))
        return torch.where(valid[..., None], h, float("nan"))

    def forward(self, tokens: torch.Tensor, thresholds=None, chunk_size: int = 64
                ) -> tuple[torch.Tensor, list[RouteInfo]]:
        """Parallel form: tokens [B, T] -> logits [B, T, vocab], route info per layer."""
        self._check_tokens(tokens, 2)
        tau = self.thresholds(thresholds)
        h = self.embed(tokens)
        routes = []
        for i, block in enumerate(self.blocks):
            y, info = block.mixer(block.norm_mixer(h), tau[i], chunk_size)
            h = h + y
            h = h + block.mlp(block.norm_mlp(h))
            routes.append(info)
        return self._logits(h), routes

    def init_state(self, batch: int, capacity: int, device=None, dtype=torch.float32,
                   fill: float = 0.0) -> list[LayerState]:
        """An empty decoding state for ``batch`` sequences with a KV cache of ``capacity`` entries per layer."""
        if batch < 1 or capacity < 0:
            raise InputError(f"need batch >= 1 and capacity >= 0, got batch={batch}, capacity={capacity}")
        return [layer.init_state(batch, capacity, device, dtype, fill) for layer in self.layers]

    def prefill(self, tokens: torch.Tensor, state: list[LayerState], thresholds=None, policy: str = "error"
                ) -> tuple[torch.Tensor, list[LayerState], list[RouteInfo]]:
        """Prompt form: tokens [B, T] from ``state`` -> logits [B, T, vocab], new state, route info per layer.

        ``policy`` applies when a routed token finds the cache full: ``error`` raises CacheFullError, ``drop`` and
        ``evict`` are those of :func:`ham_export.ops.reference.cache_append`.
        """
        self._check_tokens(tokens, 2)
        return self.run_with_state(tokens, state, self.thresholds(thresholds), policy, decode=False)

    def step(self, tokens: torch.Tensor, state: list[LayerState], thresholds=None, policy: str = "error"
             ) -> tuple[torch.Tensor, list[LayerState], list[RouteInfo]]:
        """Decode form: tokens [B] (one per sequence) -> logits [B, vocab], new state, route info per layer."""
        self._check_tokens(tokens, 1)
        return self.run_with_state(tokens, state, self.thresholds(thresholds), policy, decode=True)

    def run_with_state(self, tokens: torch.Tensor, state: list[LayerState], tau: torch.Tensor, policy: str,
                       decode: bool, in_place: bool = False
                       ) -> tuple[torch.Tensor, list[LayerState], list[RouteInfo]]:
        """:meth:`prefill` (``decode=False``) or :meth:`step` without input checks: the traceable core that the
        exported programs call. ``tau`` is the [n_layers] threshold tensor; ``in_place`` writes the new state into
        ``state`` (see :meth:`HAMLayer.prefill`)."""
        h = self._embed(tokens)
        new_state, routes = [], []
        for i, block in enumerate(self.blocks):
            form = block.mixer.step if decode else block.mixer.prefill
            y, s, info = form(block.norm_mixer(h), state[i], tau[i], policy, in_place)
            h = h + y
            h = h + block.mlp(block.norm_mlp(h))
            new_state.append(s)
            routes.append(info)
        return self._logits(h), new_state, routes

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def resolve_thresholds(values: float | Sequence[float] | torch.Tensor, n_layers: int) -> torch.Tensor:
    """One threshold for every layer, or one per layer, as a float32 tensor [n_layers]; refused unless finite."""
    try:
        tau = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"thresholds must be a number or a list of numbers, got {values!r:.80}") from exc
    if tau.numel() == 1:
        tau = tau.expand(n_layers)
    if tau.numel() != n_layers:
        raise InputError(f"got {tau.numel()} thresholds for a model with {n_layers} layers; give one value or "
                         f"{n_layers}")
    if not bool(torch.isfinite(tau).all()):
        raise InputError(f"thresholds must be finite numbers, got {tau.tolist()}")
    return tau.contiguous()


def cached_fraction(routes: list[RouteInfo]) -> list[float]:
    """The fraction of tokens routed into the cache, per layer."""
    return [float(info.routed.float().mean()) for info in routes]
