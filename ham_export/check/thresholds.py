"""Thresholds for a check that no score lands on: a route decision at a score within rounding of the threshold may
flip between two correct implementations, and then the check stops comparing that sequence (a near flip). A parity
test wants every sequence compared to the end, so it picks its threshold in a gap between the scores."""

from __future__ import annotations

import torch

from ..backends.base import Runner
from ..errors import InputError


def scores_of_run(runner: Runner, prompts: torch.Tensor, steps: int, tau: float | list[float]) -> torch.Tensor:
    """Every router score [L, N] of a prefill of ``prompts`` and ``steps`` greedy decode steps at ``tau``."""
    out, state = runner.prefill(prompts, tau)
    scores = [out.cpu().scores.flatten(1)]
    token = out.logits[:, -1].argmax(-1).cpu()
    for _ in range(steps):
        out, state = runner.step(token, tau, state)
        scores.append(out.cpu().scores.flatten(1))
        token = out.logits.argmax(-1).cpu()
    return torch.cat(scores, 1).double()


def threshold_in_gap(runner: Runner, prompts: torch.Tensor, steps: int, fraction: float = 0.5,
                     clearance: float = 1e-3, attempts: int = 8) -> float:
    """One threshold for every layer that routes about ``fraction`` of the tokens and that no score of the run at
    that threshold lies within ``clearance`` of.

    The scores depend on the threshold (a routed token changes what later tokens attend to), so the threshold is
    moved to the middle of the gap around it in the run at that threshold, until it is clear.
    """
    scores = scores_of_run(runner, prompts, steps, -1.0).flatten()
    tau = float(scores.quantile(fraction))
    for _ in range(attempts):
        scores = scores_of_run(runner, prompts, steps, tau).flatten().sort().values
        if float((scores - tau).abs().min()) > clearance:
            return tau
        above = scores[scores > tau]
        below = scores[scores <= tau]
        if not above.numel() or not below.numel():
            break
        # the widest gap among the scores near tau (a few on each side)
        window = torch.cat([below[-8:], above[:8]])
        gaps = window[1:] - window[:-1]
        i = int(gaps.argmax())
        tau = float((window[i] + window[i + 1]) / 2)
    raise InputError(f"no threshold clear of every score by {clearance} near the {fraction:.0%} quantile")
