"""GPU benchmark of one HAM layer's decode step: the Triton kernels against plain PyTorch and against SDPA.

One decode token for one layer = the GDN step (read and write the state) + the cache side (score, route,
attention over the valid cache entries, append). Three ways to run it, on the same inputs:

- ``triton``: :func:`ham_export.kernels.gdn.gdn_step` (state updated in place) +
  :func:`ham_export.kernels.decode_step.decode_step_`;
- ``reference``: the plain-PyTorch reference of :mod:`ham_export.ops.reference` (gdn_step, surprise, route,
  cache_attention, cache_append), as the eager model runs it;
- ``sdpa``: the usual full-cache decode: the GDN step in PyTorch, the token written at its slot, then
  ``F.scaled_dot_product_attention`` over the whole capacity with a padding mask (reads every slot, whatever the
  fill).

For each capacity (1K to 128K entries) and fill (10%, 50%, 100%: the valid entries before the step) it prints the
latency of each, the bytes the step must move at least (state read + write, valid cache entries read, one entry
written; :func:`ham_export.kernels.decode_step.min_bytes`), the Triton path's achieved bandwidth as a fraction of the
GPU's peak (a table of datasheet figures by name, and the copy bandwidth measured in the same run), and the speed-ups.

    python -m ham_export.kernels.bench            # on a CUDA GPU: the full table (Markdown, for the README)
    TRITON_INTERPRET=1 python -m ham_export.kernels.bench --smoke   # CPU: tiny shapes, checks the script only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ham_export.ops import reference as ref

# Datasheet HBM bandwidth (bytes/s) by a name fragment of torch.cuda.get_device_name(); first match wins.
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12)]
CAPACITIES = [1 << 10, 1 << 12, 1 << 14, 1 << 15, 1 << 16, 1 << 17]
FILLS = [0.1, 0.5, 1.0]


@dataclass
class Row:
    capacity: int
    fill: float
    length: int
    reference_us: float
    sdpa_us: float
    triton_us: float
    min_bytes: int
    triton_bandwidth: float  # bytes/s
    peak_fraction: float | None
    copy_fraction: float
    vs_reference: float
    vs_sdpa: float


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of ``fn`` (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy (read + write), measured here: the achievable bandwidth."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, warmup, iters)


class Case:
    """Inputs of one decode step: a state, a cache of ``capacity`` slots with ``length`` valid, one new token."""

    def __init__(self, b: int, h: int, dk: int, dv: int, capacity: int, length: int, dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        self.q = ref.l2_normalize(rand(b, h, dk))
        self.k = ref.l2_normalize(rand(b, h, dk))
        self.v = rand(b, h, dv)
        self.alpha = torch.rand(b, h, generator=g).to(device) * 0.5 + 0.5
        self.beta = torch.rand(b, h, generator=g).to(device)
        self.state = rand(b, h, dk, dv, dt=torch.float32) * 0.1
        self.k_cache = rand(b, h, capacity, dk)
        self.v_cache = rand(b, h, capacity, dv)
        self.score_cache = torch.rand(b, capacity, generator=g).to(device=device, dtype=dtype)
        self.length0 = torch.full((b,), length, dtype=torch.int64, device=device)
        self.length = self.length0.clone()
        self.tau = torch.tensor(-1.0, device=device)  # store every token: the most work per step
        self.scale = torch.full((h,), 8.0, device=device, dtype=dtype)
        self.dtype = dtype

    def reset(self) -> None:
        self.length.copy_(self.length0)


def run_reference(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    o_rnn, vhat, _ = ref.gdn_step(c.q.float(), c.k.float(), c.v.float(), c.alpha, c.beta, c.state)
    score = ref.surprise(vhat, c.v.float()).amin(-1, keepdim=True).to(c.dtype)  # [B, 1]
    routed = ref.route(score, c.tau.to(score.dtype))
    q, k, v = c.q[:, :, None], c.k[:, :, None], c.v[:, :, None]
    o = ref.cache_attention(q, c.k_cache, c.v_cache, c.length, k, v, routed, c.scale)
    ref.cache_append(c.k_cache, c.v_cache, c.score_cache, c.length, k, v, score, routed, "drop")
    return o_rnn, o


def run_sdpa(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    o_rnn, vhat, _ = ref.gdn_step(c.q.float(), c.k.float(), c.v.float(), c.alpha, c.beta, c.state)
    score = ref.surprise(vhat, c.v.float()).amin(-1, keepdim=True)
    routed = score[:, 0] >= c.tau
    b, capacity = c.k_cache.shape[0], c.k_cache.shape[2]
    store = routed & (c.length < capacity)  # drop at a full cache
    slot = c.length.clamp_max(capacity - 1)
    rows = torch.arange(b, device=slot.device)
    c.k_cache[rows, :, slot] = torch.where(store[:, None, None], c.k, c.k_cache[rows, :, slot])
    c.v_cache[rows, :, slot] = torch.where(store[:, None, None], c.v, c.v_cache[rows, :, slot])
    valid = torch.arange(capacity, device=slot.device) < (c.length + store.long())[:, None]
    q = (c.q * c.scale[None, :, None].to(c.dtype))[:, :, None]
    return o_rnn, F.scaled_dot_product_attention(q, c.k_cache, c.v_cache, attn_mask=valid[:, None, None, :],
                                                 scale=1.0)


def run_triton(c: Case, gdn, step) -> tuple[torch.Tensor, torch.Tensor]:
    o_rnn, vhat, _ = gdn.gdn_step(c.q, c.k, c.v, c.alpha, c.beta, c.state, out_state=c.state)
    q, k, v, vhat = c.q[:, :, None], c.k[:, :, None], c.v[:, :, None], vhat[:, :, None]
    o, _, _, _ = step.decode_step_(q, k, v, vhat, c.k_cache, c.v_cache, c.score_cache, c.length, c.tau, c.scale,
                                   "drop")
    return o_rnn, o


def check_agreement(case: Case, gdn, step) -> float:
    """Max |Triton - reference| over the GDN read-out and the attention output, from the same state and cache."""
    case.reset()
    want = run_reference(case)
    state = case.state.clone()
    got = run_triton(case, gdn, step)
    case.state.copy_(state)
    case.reset()
    return max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True))


def bench(args: argparse.Namespace) -> tuple[dict, list[Row]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("ham_export.kernels.bench: no CUDA GPU is visible to torch; run it on a GPU machine, or with "
                         "TRITON_INTERPRET=1 and --smoke to check the script on the CPU")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("ham_export.kernels.bench: --smoke on the CPU needs TRITON_INTERPRET=1")
    from ham_export.kernels import decode_step as step
    from ham_export.kernels import gdn

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    peak = peak_bandwidth(name) if device.type == "cuda" else None
    copy_bw = copy_bandwidth(device, args.copy_mib << 20, args.warmup, args.iters)
    info = {"device": name, "dtype": args.dtype, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
            "peak_bandwidth": peak, "copy_bandwidth": copy_bw, "torch": torch.__version__}
    rows = []
    for capacity in args.capacities:
        for fill in args.fills:
            length = min(capacity, max(1, round(fill * capacity)))
            case = Case(args.batch, args.heads, args.head_dim, args.head_dim, capacity, length, dtype, device)
            err = check_agreement(case, gdn, step)
            if not err <= args.atol:
                raise SystemExit(f"ham_export.kernels.bench: the Triton step differs from the reference by {err:.3g} "
                                 f"at capacity {capacity}, fill {fill} (atol {args.atol}); not timing a wrong kernel")
            times = {}
            for label, fn in [("reference", lambda c=case: run_reference(c)),
                              ("sdpa", lambda c=case: run_sdpa(c)),
                              ("triton", lambda c=case: run_triton(c, gdn, step))]:
                case.reset()
                times[label] = timed(fn, device, args.warmup, args.iters)
            state_bytes = 2 * case.state.numel() * case.state.element_size()
            moved = state_bytes + step.min_bytes(args.batch, args.heads, args.batch * length, args.head_dim,
                                                 args.head_dim, dtype)
            bw = moved / times["triton"]
            rows.append(Row(capacity, fill, length, times["reference"] * 1e6, times["sdpa"] * 1e6,
                            times["triton"] * 1e6, moved, bw, bw / peak if peak else None, bw / copy_bw,
                            times["reference"] / times["triton"], times["sdpa"] / times["triton"]))
    return info, rows


def markdown(info: dict, rows: list[Row]) -> str:
    peak = f"{info['peak_bandwidth'] / 1e12:.2f} TB/s" if info["peak_bandwidth"] else "unknown"
    lines = [f"{info['device']}, {info['dtype']}, batch {info['batch']}, {info['heads']} heads of "
             f"{info['head_dim']}; datasheet peak {peak}, copy measured {info['copy_bandwidth'] / 1e12:.2f} TB/s.",
             "",
             "| capacity | fill | reference µs | SDPA (full cache) µs | Triton µs | Triton TB/s | % of peak | "
             "% of copy | × reference | × SDPA |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        frac = f"{100 * r.peak_fraction:.0f}" if r.peak_fraction is not None else "n/a"
        lines.append(f"| {r.capacity} | {r.fill:.0%} | {r.reference_us:.1f} | {r.sdpa_us:.1f} | {r.triton_us:.1f} | "
                     f"{r.triton_bandwidth / 1e12:.2f} | {frac} | {100 * r.copy_fraction:.0f} | "
                     f"{r.vs_reference:.1f} | {r.vs_sdpa:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--capacities", type=int, nargs="+", default=CAPACITIES)
    parser.add_argument("--fills", type=float, nargs="+", default=FILLS)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--copy-mib", type=int, default=1024, help="Size of the copy that measures bandwidth.")
    parser.add_argument("--atol", type=float, default=2e-2, help="Largest |Triton - reference| accepted on o.")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes, few iterations (a check of the script).")
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.heads, args.head_dim = 1, 2, 16
        args.capacities, args.fills, args.warmup, args.iters, args.copy_mib = [64, 100], [0.1, 1.0], 1, 2, 1
    if any(not 0 < f <= 1 for f in args.fills) or any(c < 1 for c in args.capacities) or args.iters < 1:
        parser.error("fills must be in (0, 1], capacities >= 1, iters >= 1")
    if not math.isfinite(args.atol):
        parser.error("--atol must be finite")
    info, rows = bench(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
    print(markdown(info, rows))


if __name__ == "__main__":
    main()
