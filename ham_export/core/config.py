"""The HAM model configuration.

A :class:`HAMConfig` fully describes a HAM language model's shapes and switches; the weights are not part of it.
It is stored in every checkpoint (``model.pt`` and ``config.json``) and validated on construction, so that a bad
value fails with a message naming the field instead of a shape error deep inside a forward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

ROUTERS = ("cosine", "learned")


MAX_SIZE = (1 << 31) - 1
"""The largest size a config field may give (the kernels index with int32)."""
MAX_LAYERS = 1024


@dataclass(frozen=True)
class HAMConfig:
    """Shapes and switches of a HAM language model.

    Attributes:
        vocab_size: token vocabulary; 256 for the byte-level tokenizer.
        d_model: residual stream width.
        n_layers: number of blocks; every block's mixer is a HAM layer.
        n_heads: heads of the GDN and of the attention (they share q, k, v).
        head_dim: key/query width per head, d_k.
        head_dim_v: value width per head, d_v.
        conv_width: width of the causal depthwise conv on [q | k | v] (switch; 1 means no mixing in time).
        router: ``cosine`` routes on the GDN's prediction error e = 1 - cos(vhat, v) (min over heads);
            ``learned`` routes on p = sigmoid(MLP(x)) (switch).
        router_hidden: hidden width of the learned router's MLP (unused by the cosine router).
        thresholds: tau per layer; a token is cached when its score >= tau. tau <= 0 caches every token,
            tau > 2 caches none (for both routers).
        mlp_hidden: hidden width of the SwiGLU MLP.
        norm_eps: epsilon of every RMSNorm.
        context_length: the sequence length the model was trained on (the default evaluation window).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    head_dim_v: int = 32
    conv_width: int = 4
    router: str = "cosine"
    router_hidden: int = 32
    thresholds: tuple[float, ...] = field(default=())
    mlp_hidden: int = 384
    norm_eps: float = 1e-6
    context_length: int = 256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "head_dim_v", "conv_width",
                     "router_hidden", "mlp_hidden", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
            bound = MAX_LAYERS if name == "n_layers" else MAX_SIZE
            if value > bound:
                raise ConfigError(f"config.{name} must be at most {bound:,}, got {value:,}")
        if self.router not in ROUTERS:
            raise ConfigError(f"config.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"config.norm_eps must be in (0, 1), got {self.norm_eps!r}")
        thresholds = tuple(self.thresholds) if self.thresholds else (0.5,) * self.n_layers
        if len(thresholds) != self.n_layers:
            raise ConfigError(
                f"config.thresholds has {len(thresholds)} values but the model has {self.n_layers} layers")
        for tau in thresholds:
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
                raise ConfigError(f"config.thresholds must be finite numbers, got {tau!r}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in thresholds))

    @property
    def qkv_channels(self) -> int:
        """Channels of the concatenated [q | k | v] projection that the conv runs over."""
        return self.n_heads * (2 * self.head_dim + self.head_dim_v)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["thresholds"] = list(self.thresholds)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> HAMConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(map(str, unknown))}")
        values = dict(data)
        if "thresholds" in values:
            if not isinstance(values["thresholds"], (list, tuple)):
                raise ConfigError("config.thresholds must be a list of numbers")
            values["thresholds"] = tuple(values["thresholds"])
        return cls(**values)

    def with_thresholds(self, thresholds: tuple[float, ...] | list[float]) -> HAMConfig:
        return dataclasses.replace(self, thresholds=tuple(float(t) for t in thresholds))
