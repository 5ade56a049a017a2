"""The eager model as a runner: the plain-PyTorch reference every artifact is checked against.

It has no artifact and is not a registered backend; :func:`eager_runner_like` gives it the capacity and overflow
policy of an artifact's runner, so that the two compare like with like.
"""

from __future__ import annotations

import torch

from ..core.model import HAMLM, RouteInfo
from .base import Output, Runner
from .programs import flatten_state, unflatten_state


class EagerRunner(Runner):
    """The plain-PyTorch model (``HAMLM.prefill`` / ``HAMLM.step``), functional, on the model's device."""

    name = "eager"

    def __init__(self, model: HAMLM, capacity: int, policy: str) -> None:
        super().__init__(None)
        self.model, self._capacity, self._policy = model.eval(), capacity, policy
        self._open = True  # nothing to load

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def dtype(self) -> str:
        return "fp16" if self.model.embed.weight.dtype == torch.float16 else "fp32"

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def open(self) -> EagerRunner:
        return self

    def close(self) -> None:
        """Nothing to release: the model stays usable."""

    @torch.no_grad()
    def _prefill(self, tokens, thresholds):
        weight = self.model.embed.weight
        state = self.model.init_state(tokens.shape[0], self.capacity, weight.device, weight.dtype)
        logits, state, routes = self.model.prefill(tokens.to(weight.device), state, thresholds, self.policy)
        return head(logits, routes), state

    @torch.no_grad()
    def _step(self, token, thresholds, state):
        logits, state, routes = self.model.step(token.to(self.model.embed.weight.device), state, thresholds,
                                                self.policy)
        return head(logits, routes), state

    def state_tensors(self, state):
        return [x.detach().cpu() for x in flatten_state(state)]

    def state_from_tensors(self, tensors):
        weight = self.model.embed.weight
        return unflatten_state([t.to(weight.device, weight.dtype if t.is_floating_point() else t.dtype).contiguous()
                                for t in tensors])


def head(logits: torch.Tensor, routes: list[RouteInfo]) -> Output:
    """The :class:`Output` of one call of the model: logits and the routes of every layer, stacked."""
    return Output(logits, torch.stack([r.score for r in routes]), torch.stack([r.routed for r in routes]),
                  torch.stack([r.overflow for r in routes]))


def eager_runner_like(model: HAMLM, runner: Runner) -> EagerRunner:
    """The eager model with the artifact's capacity and policy, so that the two compare like with like."""
    return EagerRunner(model, runner.capacity, runner.policy)
