"""The ``ham-export`` command line. Commands only parse options, call the library and print.

Exit codes: 0 success; 1 a check or budget that failed; 2 bad usage or input (a missing or broken file, a bad
option value). A user's mistake prints one line on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .errors import HamError

out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a HamError into its message on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HamError as exc:
            err.print(f"[bold red]error:[/] {exc}")
            sys.exit(exc.exit_code)

    return wrapper


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ham-export")
def main() -> None:
    """Export, check and measure HAM (Hybrid Associative Memory) models."""


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_user_errors
def inspect(model: str, as_json: bool) -> None:
    """Show a model's config, size, router, thresholds and state bytes per dtype."""
    from . import checkpoint
    from .memory import byte_table

    ckpt = checkpoint.load(model)
    cfg = ckpt.config
    info = {
        "path": str(ckpt.path),
        "config": cfg.to_dict(),
        "parameters": ckpt.model.num_parameters(),
        "router": cfg.router,
        "thresholds": list(cfg.thresholds),
        "bytes": byte_table(cfg, ckpt.model.num_parameters()),
        "metadata": ckpt.metadata,
    }
    if as_json:
        _emit_json(info)
        return
    table = Table(title=f"{ckpt.path}: HAM model, {info['parameters']:,} parameters")
    table.add_column("field")
    table.add_column("value")
    for key, value in cfg.to_dict().items():
        if key != "thresholds":
            table.add_row(key, str(value))
    table.add_row("thresholds (per layer)", ", ".join(f"{t:.4f}" for t in cfg.thresholds))
    out.print(table)
    sizes = Table(title="bytes (per sequence for state; per cached token for KV)")
    for column in ("dtype", "weights", "fixed state / seq", "KV / cached token", "KV / token / layer"):
        sizes.add_column(column, justify="right")
    for dtype, row in info["bytes"].items():
        sizes.add_row(dtype, f"{row['weights']:,}", f"{row['fixed_state_per_sequence']:,}",
                      f"{row['kv_per_cached_token']:,}", f"{row['kv_per_cached_token_per_layer']:,}")
    out.print(sizes)


@main.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Text file to score (default: the held-out pydoc topics the bundled models never saw).")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="A threshold for every layer; repeat for several. Default: the model's own, per layer.")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Bytes per evaluation window (default: the model's training context).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def eval_(model: str, data: str | None, thresholds: tuple[float, ...], window: int | None, as_json: bool) -> None:
    """Held-out bits per byte and cached fraction per layer at each threshold."""
    from rich.progress import Progress

    from . import checkpoint
    from .data import pydoc_corpus, read_text_file
    from .errors import InputError
    from .evaluate import evaluate

    bad = [t for t in thresholds if not math.isfinite(t)]
    if bad:
        raise InputError(f"--threshold must be a finite number, got {bad[0]}")
    ckpt = checkpoint.load(model)
    if data is None:
        corpus = pydoc_corpus()
        text = corpus.held_out
        expected = ckpt.metadata.get("held_out_sha256")
        if expected and expected != corpus.held_out_sha256:
            err.print("[yellow]warning:[/] this Python's pydoc topics differ from the ones the model was trained "
                      "with; the held-out text is not the same")
        source = "held-out pydoc topics"
    else:
        text = read_text_file(data)
        source = data
    settings: list[float | None] = list(thresholds) or [None]
    window = window or ckpt.config.context_length
    n_windows = -(-(len(text) - 1) // window)
    with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("evaluating", total=n_windows * len(settings))
        rows = evaluate(ckpt.model, text, settings, window, progress=lambda n: bar.advance(task, n))
    if as_json:
        _emit_json({"model": str(ckpt.path), "data": source, "window": window, "rows": [r.to_dict() for r in rows]})
        return
    table = Table(title=f"{ckpt.path} on {source} ({rows[0].tokens:,} bytes, windows of {window})")
    for column in ("threshold", "bits/byte", "KV fraction", "per layer"):
        table.add_column(column, justify="right")
    for row in rows:
        label = (f"{row.threshold:g}" if isinstance(row.threshold, float)
                 else "model: " + ", ".join(f"{t:.3f}" for t in row.threshold))
        table.add_row(label, f"{row.bits_per_byte:.4f}", f"{row.kv_fraction:.3f}",
                      " ".join(f"{f:.2f}" for f in row.kv_fraction_per_layer))
    out.print(table)


def _export_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--policy", type=click.Choice(["drop", "evict"]), default="drop", show_default=True,
                      help="What a routed token does when it finds the cache full.")(fn)
    fn = click.option("--context", type=click.IntRange(min=1), default=1024, show_default=True,
                      help="The longest sequence (prompt + generated) the engine is built for.")(fn)
    fn = click.option("--max-cache", type=click.IntRange(min=1), default=None,
                      help="Cache capacity per layer (default: --context, so that no policy ever applies).")(fn)
    return fn


@main.command("torch")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=str), required=True)
@_export_options
@_user_errors
def torch_(model: str, out: str, max_cache: int | None, context: int, policy: str) -> None:
    """Export the prefill and decode programs with torch.export (prefill.pt2, decode.pt2)."""
    from . import checkpoint
    from .export import export_torch

    ckpt = checkpoint.load(model)
    folder = export_torch(ckpt.model, out, max_cache or context, policy, source=ckpt.path)
    err.print(f"wrote {folder}/prefill.pt2, decode.pt2 and ham_export.json (capacity {max_cache or context}, "
              f"policy {policy})")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=str), required=True)
@click.option("--ops", type=click.Choice(["custom", "standard"]), default="custom", show_default=True,
              help="custom: ham.ai nodes run by the op library of runtimes/onnxruntime; standard: standard ONNX "
                   "ops only, for any runtime.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@_export_options
@_user_errors
def onnx(model: str, out: str, ops: str, dtype: str, max_cache: int | None, context: int, policy: str) -> None:
    """Export the prefill and decode programs to ONNX (prefill.onnx, decode.onnx, ham_export.json)."""
    from . import checkpoint
    from .export import export_onnx

    ckpt = checkpoint.load(model)
    folder = export_onnx(ckpt.model, out, max_cache or context, policy, ops, dtype, source=ckpt.path)
    err.print(f"wrote {folder}/prefill.onnx, decode.onnx and ham_export.json ({ops} ops, {dtype}, capacity "
              f"{max_cache or context}, policy {policy})")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--prompts", type=click.Path(path_type=str), default=None,
              help="Text file, one prompt per line (cut to the shortest; default: 3 held-out snippets).")
@click.option("--steps", type=click.IntRange(min=0), default=64, show_default=True, help="Decode steps.")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="A threshold for every layer; repeat for several. Default: the model's own, -1 (cache "
                   "every token) and 3 (cache none).")
@click.option("--atol", type=click.FloatRange(min=0), default=None, help="Default: 1e-4 (fp32), 3e-2 (fp16).")
@click.option("--rtol", type=click.FloatRange(min=0), default=None, help="Default: 1e-4 (fp32), 3e-2 (fp16).")
@click.option("--margin", type=click.FloatRange(min=0), default=None,
              help="Route flips with |score - tau| <= margin are reported apart, not failed. "
                   "Default: 1e-4 (fp32), 1e-2 (fp16).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def check(model: str, artifact: str, prompts: str | None, steps: int, thresholds: tuple[float, ...],
          atol: float | None, rtol: float | None, margin: float | None, as_json: bool) -> None:
    """Check an exported artifact against the eager model: prefill + N decode steps at each threshold."""
    from . import checkpoint
    from .check import DEFAULT_TOLERANCE, compare, default_prompts, read_prompts
    from .errors import InputError
    from .runners import eager_runner_like, load_runner

    bad = [t for t in thresholds if not math.isfinite(t)]
    if bad:
        raise InputError(f"--threshold must be a finite number, got {bad[0]}")
    ckpt = checkpoint.load(model)
    runner = load_runner(artifact)
    runner.check_model(ckpt.model)
    tolerance = DEFAULT_TOLERANCE[runner.dtype]
    atol, rtol, margin = (tolerance[0] if atol is None else atol, tolerance[1] if rtol is None else rtol,
                          tolerance[2] if margin is None else margin)
    tokens = read_prompts(prompts) if prompts else default_prompts()
    settings: list[float | list[float]] = list(thresholds) or [list(ckpt.config.thresholds), -1.0, 3.0]
    results = compare(eager_runner_like(ckpt.model, runner), runner, tokens, settings, steps, atol, rtol, margin)
    passed = all(r.passed for r in results)
    report = {
        "passed": passed,
        "artifact": str(artifact),
        "backend": runner.name,
        "max_abs_err": max(r.max_abs_err for r in results),
        "max_state_err": max(r.max_state_err for r in results),
        "min_atol": max(r.min_atol for r in results),
        "atol": atol, "rtol": rtol, "margin": margin,
        "prompts": list(tokens.shape), "steps": steps,
        "rows": [r.to_dict() for r in results],
    }
    if as_json:
        _emit_json(report)
    else:
        table = Table(title=f"{artifact} ({runner.name}) vs eager: {tokens.shape[0]} prompts of "
                            f"{tokens.shape[1]} bytes + {steps} steps")
        for column in ("threshold", "result", "max |logit err|", "max state err", "min atol",
                       "near flips", "far flips", "KV fraction"):
            table.add_column(column, justify="right")
        for r in results:
            label = f"{r.threshold:g}" if isinstance(r.threshold, float) else "own"
            table.add_row(label, "[green]pass[/]" if r.passed else "[red]FAIL[/]", f"{r.max_abs_err:.2e}",
                          f"{r.max_state_err:.2e}", f"{r.min_atol:.2e}", str(r.near_flips), str(r.far_flips),
                          f"{r.kv_fraction:.3f}")
        out.print(table)
        for r in results:
            for failure in r.failures[:5]:
                out.print(f"[red]{r.threshold}:[/] {failure}")
        out.print(f"smallest atol that passes at rtol {rtol:g}: {report['min_atol']:.3g}")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
