"""Greedy generation on top of any runner."""

from __future__ import annotations

import torch

from .base import Output, Runner


def greedy(runner: Runner, prompt: torch.Tensor, steps: int, thresholds: torch.Tensor | float
           ) -> tuple[torch.Tensor, list[Output]]:
    """Prefill ``prompt`` [B, T], then pick the most likely token ``steps`` times: ([B, steps] tokens, outputs).

    The outputs are the prefill's, then one per decode step (each with its overflow counts, which a caller
    should surface: a non-zero count means the cache was full and the artifact's policy applied).
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
    out, state = runner.prefill(prompt, thresholds)
    outputs = [out]
    token = out.logits[:, -1].argmax(-1)
    tokens = []
    for step in range(steps):
        tokens.append(token)
        if step + 1 == steps:
            break
        out, state = runner.step(token, thresholds, state)
        outputs.append(out)
        token = out.logits.argmax(-1)
    return (torch.stack(tokens, 1) if tokens else prompt.new_zeros(prompt.shape[0], 0)), outputs
