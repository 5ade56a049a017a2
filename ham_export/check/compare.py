"""Compare an artifact's runner with the eager model: logits, scores, route decisions and state at every step.

Both runners get the same prompts, a prefill and then N decode steps, feeding both the eager model's greedy
token, so an error cannot hide behind a different continuation. Route decisions are discrete and compared
exactly. A flip at a token whose eager score lies within ``margin`` of the threshold is rounding, not a bug: it is
reported apart, and the sequence is not compared after it (its caches legitimately differ from then on). A flip
farther from the threshold fails the check. Under ``evict``, a sequence whose caches differ after an eviction
decision that a change of the scores by ``margin`` could have changed (a near tie on the eviction grid,
:func:`ham_export.ops.reference.evict_near_ties`) is reported apart the same way (a near tie); where the caches
agree, it goes on being compared.

Tolerance policy: a value passes when |candidate - eager| <= atol + rtol * |eager|, for the logits, the scores,
the GDN state, the conv tails and the valid cache entries; lengths and overflow counts must be equal. The report
gives the smallest atol (at the given rtol) that would have passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backends.base import Output, Runner
from ..backends.programs import STATE_FIELDS
from ..ops.reference import evict_near_ties

DEFAULT_TOLERANCE = {"fp32": (1e-4, 1e-4, 1e-4), "fp16": (3e-2, 3e-2, 1e-2)}  # atol, rtol, margin


@dataclass
class ThresholdResult:
    """The comparison at one threshold setting."""

    threshold: float | list[float]
    steps: int
    max_abs_err: float = 0.0  # logits
    max_state_err: float = 0.0  # GDN state, conv tails, valid cache entries, scores
    min_atol: float = 0.0  # smallest atol that passes at the given rtol, over everything compared
    length_mismatches: int = 0
    overflow_mismatches: int = 0
    far_flips: int = 0
    near_flips: int = 0
    near_ties: int = 0  # sequences whose caches differ after an eviction decided by a near tie
    diverged_sequences: int = 0
    sequences: int = 0
    compared_sequences: int = 0  # sequences compared to the last step (no near flip, no near tie)
    kv_fraction: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold, "passed": self.passed, "steps": self.steps,
            "max_abs_err": self.max_abs_err, "max_state_err": self.max_state_err, "min_atol": self.min_atol,
            "length_mismatches": self.length_mismatches, "overflow_mismatches": self.overflow_mismatches,
            "far_flips": self.far_flips, "near_flips": self.near_flips, "near_ties": self.near_ties,
            "diverged_sequences": self.diverged_sequences, "sequences": self.sequences,
            "compared_sequences": self.compared_sequences, "kv_fraction": self.kv_fraction,
            "failures": self.failures,
        }


def _layers(state: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A flat state (:data:`STATE_FIELDS` per layer) as one dict per layer, on the CPU."""
    n = len(STATE_FIELDS)
    return [dict(zip(STATE_FIELDS, (x.cpu() for x in state[i: i + n]), strict=True)) for i in range(0, len(state), n)]


def _entries(layer: dict[str, torch.Tensor], b: int, valid: int) -> dict[str, torch.Tensor]:
    """Sequence ``b``'s first ``valid`` cache entries of a layer: the keys, values and scores that are compared (the
    slots past the length are undefined by the ops' contract)."""
    return {"k_cache": layer["k_cache"][b, :, :valid], "v_cache": layer["v_cache"][b, :, :valid],
            "score_cache": layer["score_cache"][b, :valid]}


class _Tracker:
    """Accumulates errors over the calls of one threshold, over the sequences still comparable."""

    def __init__(self, result: ThresholdResult, atol: float, rtol: float, margin: float, batch: int,
                 policy: str) -> None:
        self.result, self.atol, self.rtol, self.margin, self.policy = result, atol, rtol, margin, policy
        self.live = torch.ones(batch, dtype=torch.bool)  # sequences not yet past a near flip or a near tie
        self.routed = self.tokens = 0
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # eager's (score_cache, length) per layer

    def _caches_differ(self, ref_state: list[torch.Tensor], got_state: list[torch.Tensor]) -> torch.Tensor:
        """[B] bool: the sequences whose caches (length, valid keys, values and scores) differ, in any layer."""
        batch = ref_state[STATE_FIELDS.index("length")].shape[0]
        differ = torch.zeros(batch, dtype=torch.bool)
        for ref, got in zip(_layers(ref_state), _layers(got_state), strict=True):
            for b in range(batch):
                valid = int(ref["length"][b])
                if int(got["length"][b]) != valid:
                    differ[b] = True
                    continue
                for want, have in zip(_entries(ref, b, valid).values(), _entries(got, b, valid).values(),
                                      strict=True):
                    want, have = want.double(), have.double()
                    if have.shape != want.shape or not bool(((have - want).abs()
                                                             <= self.atol + self.rtol * want.abs()).all()):
                        differ[b] = True
        return differ

    def _near_ties(self, ref: Output, ref_state: list[torch.Tensor]) -> torch.Tensor:
        """[B] bool: the sequences where an eviction decision of this call was a near tie (eager's view)."""
        n = len(STATE_FIELDS)
        score_at, length_at = STATE_FIELDS.index("score_cache"), STATE_FIELDS.index("length")
        after = [(ref_state[i + score_at].cpu(), ref_state[i + length_at].cpu()) for i in range(0, len(ref_state), n)]
        before, self.caches = self.caches, after
        near = torch.zeros(ref.routed.shape[1], dtype=torch.bool)
        if self.policy != "evict":
            return near
        for layer, (score_cache, _) in enumerate(after):
            spilled = ref.overflow[layer] > 0
            if not bool(spilled.any()):
                continue
            old_scores, old_length = before[layer] if before else (torch.zeros_like(score_cache),
                                                                   torch.zeros(len(score_cache), dtype=torch.int64))
            near |= spilled & evict_near_ties(old_scores, old_length, ref.scores[layer], ref.routed[layer],
                                              self.margin)
        return near

    def _close(self, what: str, ref: torch.Tensor, got: torch.Tensor, is_logits: bool) -> None:
        ref, got = ref.double(), got.double()
        if ref.numel() == 0:
            return
        if got.shape != ref.shape:
            self.result.failures.append(f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            return
        err = (got - ref).abs()
        err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
        worst = float(err.max())
        need = float((err - self.rtol * ref.abs()).max())
        self.result.min_atol = max(self.result.min_atol, need)
        if is_logits:
            self.result.max_abs_err = max(self.result.max_abs_err, worst)
        else:
            self.result.max_state_err = max(self.result.max_state_err, worst)
        if need > self.atol and len(self.result.failures) < 20:
            self.result.failures.append(f"{what}: max |error| {worst:.3g} exceeds atol {self.atol:g} + rtol "
                                        f"{self.rtol:g} * |eager|")

    def compare(self, call: str, tau: torch.Tensor, ref: Output, got: Output, ref_state: list[torch.Tensor],
                got_state: list[torch.Tensor]) -> None:
        live = self.live.clone()
        # Route decisions first: they decide which sequences stay comparable.
        flips = ref.routed != got.routed  # [L, B, T]
        near = (ref.scores.double() - tau.double()[:, None, None]).abs() <= self.margin
        # After a near flip at token t, every layer's input from token t on legitimately differs.
        t = flips.shape[2]
        position = torch.arange(t)
        first_near = torch.where((flips & near).any(0), position, t).amin(1)  # [B]
        comparable = live[None, :, None] & (position[None, None, :] < first_near[None, :, None])
        far = flips & ~near & comparable
        self.result.far_flips += int(far.sum())
        if bool(far.any()):
            layer, seq, tok = (int(i) for i in far.nonzero()[0])
            self.result.failures.append(
                f"{call}: route decision differs far from the threshold (layer {layer}, sequence {seq}, token "
                f"{tok}: eager score {float(ref.scores[layer, seq, tok]):.6f}, tau {float(tau[layer]):.6f})")
        near_flips = live & (first_near < t)  # [B]
        self.result.near_flips += int(near_flips.sum())
        near_ties = live & ~near_flips & self._near_ties(ref, ref_state)
        if bool(near_ties.any()):  # a near tie only ends the comparison where the two decided differently
            near_ties &= self._caches_differ(ref_state, got_state)
        self.result.near_ties += int(near_ties.sum())
        self.routed += int(ref.routed[:, live].sum())
        self.tokens += int(ref.routed[:, live].numel())
        # Outputs and state of the sequences that had no near flip or near tie before or in this call.
        keep = live & ~near_flips & ~near_ties
        self.result.diverged_sequences += int((near_flips | near_ties).sum())
        self.live = keep
        if not bool(keep.any()):
            return
        self._close(f"{call} logits", ref.logits[keep], got.logits[keep], True)
        self._close(f"{call} scores", ref.scores[:, keep], got.scores[:, keep], False)
        self.result.overflow_mismatches += int((ref.overflow[:, keep] != got.overflow[:, keep]).sum())
        for i, (layer, other) in enumerate(zip(_layers(ref_state), _layers(got_state), strict=True)):
            where = f"{call} layer {i}"
            lengths, got_lengths = layer["length"][keep], other["length"][keep]
            mismatched = int((lengths != got_lengths).sum())
            self.result.length_mismatches += mismatched
            if mismatched:
                self.result.failures.append(f"{where}: cache lengths {got_lengths.tolist()}, expected "
                                            f"{lengths.tolist()}")
                continue
            self._close(f"{where} GDN state", layer["ssm"][keep], other["ssm"][keep], False)
            self._close(f"{where} conv tail", layer["conv"][keep], other["conv"][keep], False)
            for b in keep.nonzero().flatten().tolist():
                valid = int(layer["length"][b])
                theirs = _entries(other, b, valid)
                for name, mine in _entries(layer, b, valid).items():
                    self._close(f"{where} {name}", mine, theirs[name], False)


def compare(reference: Runner, candidate: Runner, prompts: torch.Tensor, thresholds: list[float | list[float]],
            steps: int, atol: float, rtol: float, margin: float) -> list[ThresholdResult]:
    """Run both runners on ``prompts`` [B, T] (prefill + ``steps`` decode steps) at each threshold setting."""
    results = []
    for threshold in thresholds:
        tau = reference.check_thresholds(torch.as_tensor(threshold, dtype=torch.float32))
        result = ThresholdResult(threshold=threshold, steps=steps)
        tracker = _Tracker(result, atol, rtol, margin, prompts.shape[0], reference.policy)
        ref_out, ref_state = reference.prefill(prompts, tau)
        got_out, got_state = candidate.prefill(prompts, tau)
        tracker.compare("prefill", tau, ref_out.cpu(), got_out.cpu(), reference.state_tensors(ref_state),
                        candidate.state_tensors(got_state))
        token = ref_out.logits[:, -1].argmax(-1).cpu()
        for step in range(steps):
            ref_out, ref_state = reference.step(token, tau, ref_state)
            got_out, got_state = candidate.step(token, tau, got_state)
            tracker.compare(f"step {step + 1}", tau, ref_out.cpu(), got_out.cpu(),
                            reference.state_tensors(ref_state), candidate.state_tensors(got_state))
            token = ref_out.logits.argmax(-1).cpu()
        if result.length_mismatches and not any("cache lengths" in f for f in result.failures):
            result.failures.append(f"{result.length_mismatches} cache length mismatches")
        if result.overflow_mismatches:
            result.failures.append(f"{result.overflow_mismatches} overflow count mismatches")
        result.sequences, result.compared_sequences = prompts.shape[0], int(tracker.live.sum())
        if result.compared_sequences == 0:
            result.failures.append("no sequence was compared to the end: each one diverged at a near-threshold "
                                   "flip or an eviction near tie; choose another threshold or other prompts")
        result.kv_fraction = tracker.routed / max(1, tracker.tokens)
        results.append(result)
    return results


@dataclass
class CheckReport:
    """What ``ham-export check`` reports: every threshold's result, and the worst errors over all of them."""

    artifact: str
    backend: str
    atol: float
    rtol: float
    margin: float
    prompts: list[int]
    steps: int
    rows: list[ThresholdResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed, "artifact": self.artifact, "backend": self.backend,
            "max_abs_err": max(r.max_abs_err for r in self.rows),
            "max_state_err": max(r.max_state_err for r in self.rows),
            "min_atol": max(r.min_atol for r in self.rows),
            "atol": self.atol, "rtol": self.rtol, "margin": self.margin,
            "prompts": self.prompts, "steps": self.steps, "rows": [r.to_dict() for r in self.rows],
        }


def check_artifact(model, runner: Runner, prompts: torch.Tensor, thresholds: list[float | list[float]], steps: int,
                   atol: float | None = None, rtol: float | None = None, margin: float | None = None,
                   artifact: str = "") -> CheckReport:
    """``ham-export check``: the runner (open) against the eager model with the artifact's capacity and policy, at
    each threshold setting; tolerances default to the artifact dtype's (:data:`DEFAULT_TOLERANCE`)."""
    from ..backends.eager import eager_runner_like

    runner.check_model(model)
    default = DEFAULT_TOLERANCE[runner.dtype]
    atol, rtol, margin = (default[0] if atol is None else atol, default[1] if rtol is None else rtol,
                          default[2] if margin is None else margin)
    rows = compare(eager_runner_like(model, runner), runner, prompts, thresholds, steps, atol, rtol, margin)
    return CheckReport(artifact, runner.name, atol, rtol, margin, list(prompts.shape), steps, rows)
