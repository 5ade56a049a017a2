"""The ``ham-export`` command line. Commands only parse options, call the library and print.

One export command per registered backend (:mod:`ham_export.backends`), made from its entry: ``onnx``, ``torch``,
``native``, ``tvm``, ``triton``, ``trt``; then ``inspect``, ``eval``, ``check`` and ``memory``.

Exit codes: 0 success; 1 a check or budget that failed; 2 bad usage or input (a missing or broken file, a bad
option value, a size past its bound); 130 an interrupt. A user's mistake prints one line on stderr (plain text,
never a traceback), a usage mistake included.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .errors import HamError, InputError

MAX_CAPACITY = 1 << 20
"""The largest cache capacity and context an export takes (the programs' own bound on a prompt's length)."""
MAX_STEPS = 1 << 16
MAX_THRESHOLDS = 256
MAX_WINDOW = 1 << 20

out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a HamError into its message on stderr (one plain line) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _check_finite(thresholds: tuple[float, ...]) -> None:
    bad = [t for t in thresholds if not math.isfinite(t)]
    if bad:
        raise InputError(f"--threshold must be a finite number, got {bad[0]}")
    if len(thresholds) > MAX_THRESHOLDS:
        raise InputError(f"--threshold is given {len(thresholds)} times; at most {MAX_THRESHOLDS}")


def _at_most(flag: str, value: int | None, bound: int) -> None:
    if value is not None and value > bound:
        raise InputError(f"{flag} must be at most {bound:,}, got {value:,}")


def _writable(path: str, what: str, create: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: under a file, in a folder that is not
    writable, or (``what="file"`` and not ``create``) in a folder that does not exist."""
    target = Path(path)
    if target.exists() and (target.is_dir() if what == "file" else not target.is_dir()):
        raise InputError(f"{path} is a {'folder' if target.is_dir() else 'file'}; a {what} path is needed")
    parent = target.parent if what == "file" else target
    if what == "file" and not create and not parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {parent} does not exist")
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {ancestor} is not writable")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


class _Group(click.Group):
    """Click's group with ham-export's error form: a usage mistake is one line on stderr, ``error: ...``, exit 2
    (click prints three); an interrupt exits 130 with one line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.ClickException as exc:
            no_command = type(exc).__name__ == "NoArgsIsHelpError"  # bare ``ham-export``: the help, as click does
            click.echo(exc.format_message() if no_command else f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        if isinstance(result, int) and not isinstance(result, bool):  # click.exceptions.Exit's code
            sys.exit(result)
        return result


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ham-export")
def main() -> None:
    """Export, check and measure HAM (Hybrid Associative Memory) models."""


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_user_errors
def inspect(model: str, as_json: bool) -> None:
    """Show a model's config, size, router, thresholds and state bytes per dtype."""
    from .core import checkpoint
    from .memory.sizes import byte_table

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
@click.option("--task", type=click.Choice(["text", "recall"]), default="text", show_default=True,
              help="text: bits per byte of text; recall: exact-match accuracy on the synthetic associative-recall "
                   "task (key-value records in text, then queries for their values).")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Text file to score, or the recall task's distractor text (default: the held-out pydoc topics "
                   "the bundled models never saw).")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="A threshold for every layer; repeat for several. Default: the model's own, per layer.")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Bytes per evaluation window (default: the model's training context).")
@click.option("--context", "contexts", type=click.IntRange(min=8), multiple=True,
              help="recall: bytes per sequence; repeat for several (default: the task the model was trained on, "
                   "else 512).")
@click.option("--pairs", type=click.IntRange(min=1), default=None, help="recall: key-value records per sequence.")
@click.option("--queries", type=click.IntRange(min=1), default=None, help="recall: queries per sequence.")
@click.option("--gap", type=click.IntRange(min=0), default=None,
              help="recall: the least bytes of text between the last record and the first query.")
@click.option("--sequences", type=click.IntRange(min=1, max=100000), default=256, show_default=True,
              help="recall: sequences scored (the same ones at every threshold).")
@click.option("--seed", type=int, default=1234, show_default=True, help="recall: the sequences' seed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def eval_(model: str, task: str, data: str | None, thresholds: tuple[float, ...], window: int | None,
          contexts: tuple[int, ...], pairs: int | None, queries: int | None, gap: int | None, sequences: int,
          seed: int, as_json: bool) -> None:
    """Held-out bits per byte (or recall accuracy) and cached fraction per layer at each threshold."""
    from rich.progress import Progress

    from .core import checkpoint
    from .core.data import pydoc_corpus, read_text_file
    from .train.evaluate import evaluate

    _check_finite(thresholds)
    _at_most("--window", window, MAX_WINDOW)
    for context in contexts:
        _at_most("--context", context, MAX_WINDOW)
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
    if task == "recall":
        _eval_recall(ckpt, text, source, settings, contexts, pairs, queries, gap, sequences, seed, as_json)
        return
    window = window or ckpt.config.context_length
    n_windows = -(-(len(text) - 1) // window)
    with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        progress = bar.add_task("evaluating", total=n_windows * len(settings))
        rows = evaluate(ckpt.model, text, settings, window, progress=lambda n: bar.advance(progress, n))
    if as_json:
        _emit_json({"model": str(ckpt.path), "data": source, "window": window, "rows": [r.to_dict() for r in rows]})
        return
    table = Table(title=f"{ckpt.path} on {source} ({rows[0].tokens:,} bytes, windows of {window})")
    for column in ("threshold", "bits/byte", "KV fraction", "per layer"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(_threshold_label(row.threshold), f"{row.bits_per_byte:.4f}", f"{row.kv_fraction:.3f}",
                      " ".join(f"{f:.2f}" for f in row.kv_fraction_per_layer))
    out.print(table)


def _threshold_label(threshold: float | list[float]) -> str:
    return f"{threshold:g}" if isinstance(threshold, float) else "model: " + ", ".join(f"{t:.3f}" for t in threshold)


def _eval_recall(ckpt, text: bytes, source: str, settings: list[float | None], contexts: tuple[int, ...],
                 pairs: int | None, queries: int | None, gap: int | None, sequences: int, seed: int,
                 as_json: bool) -> None:
    """``eval --task recall``: the task the model was trained on (its metadata), with the options given replacing
    its parameters; one row per context x threshold."""
    import dataclasses

    from rich.progress import Progress

    from .train.recall import evaluate_recall, trained_task

    base = trained_task(ckpt.metadata)
    given = {k: v for k, v in (("pairs", pairs), ("queries", queries), ("gap", gap)) if v is not None}
    tasks = [dataclasses.replace(base, **given, context=c) for c in (contexts or (base.context,))]
    for t in tasks:
        t.check()
    rows = []
    with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        progress = bar.add_task("evaluating", total=sequences * len(settings) * len(tasks))
        for t in tasks:
            rows += evaluate_recall(ckpt.model, t, text, settings, sequences, seed,
                                    progress=lambda n: bar.advance(progress, n))
    task = dataclasses.asdict(base) | given
    del task["context"]
    if as_json:
        _emit_json({"model": str(ckpt.path), "data": source, "task": {"name": "recall", **task},
                    "sequences": sequences, "seed": seed, "rows": [r.to_dict() for r in rows]})
        return
    table = Table(title=f"{ckpt.path}: recall of {task['queries']} values of {task['pairs']} records in "
                        f"{source}, {sequences} sequences")
    for column in ("context", "threshold", "accuracy", "byte accuracy", "KV fraction", "per layer"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row.context), _threshold_label(row.threshold), f"{row.accuracy:.3f}",
                      f"{row.byte_accuracy:.3f}", f"{row.kv_fraction:.3f}",
                      " ".join(f"{f:.2f}" for f in row.kv_fraction_per_layer))
    out.print(table)


def _export_command(backend) -> click.Command:
    """The CLI command that builds one backend's artifact, from its registry entry."""
    is_file = backend.output == "file"

    def command(model: str, out: str, max_cache: int | None, context: int, policy: str, **options: Any) -> None:
        from .backends import artifact
        from .core import checkpoint

        _at_most("--max-cache", max_cache, MAX_CAPACITY)
        _at_most("--context", context, MAX_CAPACITY)
        _writable(out, "file" if is_file else "folder", create=True)  # an export makes its folders
        ckpt = checkpoint.load(model)
        capacity = max_cache or context
        with artifact.written_atomically(out, is_file) as target:
            backend.build(ckpt.model, target, capacity=capacity, policy=policy, source=ckpt.path, **options)
        path = Path(out)
        chosen = "".join(f", {o.flag.lstrip('-')} {options[o.name]}" for o in backend.options
                         if o.type is not bool and options[o.name] is not None)
        if not options.get("prepare_only"):
            click.echo(f"wrote {path} ({backend.name} artifact{chosen}, capacity {capacity}, policy {policy}); "
                       f"check it with: ham-export check {model} {path}", err=True)
        if backend.usage is not None:
            click.echo(backend.usage(path), err=True)

    command.__doc__ = f"Build {backend.summary}."
    command = _user_errors(command)
    for option in reversed(backend.options):
        if option.type is bool:
            command = click.option(option.flag, option.name, is_flag=True, default=option.default,
                                   help=option.help)(command)
            continue
        kind = click.Choice(option.choices) if option.choices else option.type
        command = click.option(option.flag, option.name, type=kind, default=option.default,
                               show_default=option.default is not None, help=option.help)(command)
    command = click.option("--policy", type=click.Choice(["drop", "evict"]), default="drop", show_default=True,
                           help="What a routed token does when it finds the cache full.")(command)
    command = click.option("--context", type=click.IntRange(min=1), default=1024, show_default=True,
                           help="The longest sequence (prompt + generated) the engine is built for.")(command)
    command = click.option("--max-cache", type=click.IntRange(min=1), default=None,
                           help="Cache capacity per layer (default: --context, so that no policy ever applies)."
                           )(command)
    out_help = ("The package to write (a .pt2 file); the manifest ham_export.json goes beside it." if is_file
                else "The artifact folder to write.")
    command = click.option("-o", "--out", required=True, help=out_help,
                           type=click.Path(file_okay=is_file, dir_okay=not is_file, path_type=str))(command)
    command = click.argument("model", type=click.Path(path_type=str))(command)
    return click.command(backend.command)(command)


def _add_export_commands() -> None:
    from .backends import registry

    for backend in registry().values():
        main.add_command(_export_command(backend))


_add_export_commands()


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
@click.option("--save-polygraphy", "polygraphy_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Also write the eager model's calls as Polygraphy input and output files into this folder (per "
                   "threshold and program), and print the `polygraphy run` lines that compare the artifact with them.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def check(model: str, artifact: str, prompts: str | None, steps: int, thresholds: tuple[float, ...],
          atol: float | None, rtol: float | None, margin: float | None, polygraphy_dir: str | None,
          as_json: bool) -> None:
    """Check an exported artifact against the eager model: prefill + N decode steps at each threshold."""
    from .backends import load_runner
    from .check.compare import check_artifact
    from .check.prompts import default_prompts, read_prompts
    from .core import checkpoint
    from .errors import InputError

    _check_finite(thresholds)
    _at_most("--steps", steps, MAX_STEPS)
    for name, value in (("--atol", atol), ("--rtol", rtol), ("--margin", margin)):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
    if polygraphy_dir is not None:
        _writable(polygraphy_dir, "folder")
    ckpt = checkpoint.load(model)
    tokens = read_prompts(prompts) if prompts else default_prompts()
    settings: list[float | list[float]] = list(thresholds) or [list(ckpt.config.thresholds), -1.0, 3.0]
    with load_runner(artifact) as runner:
        report = check_artifact(ckpt.model, runner, tokens, settings, steps, atol, rtol, margin, str(artifact))
    if polygraphy_dir is not None:
        from .backends import read_manifest
        from .check import polygraphy

        manifest = read_manifest(artifact)
        polygraphy.save(ckpt.model, manifest, tokens, settings, steps, polygraphy_dir)
        for line in polygraphy.commands(manifest, polygraphy_dir, report.atol, report.rtol):
            click.echo(line, err=True)
    if as_json:
        _emit_json(report.to_dict())
    else:
        table = Table(title=f"{artifact} ({report.backend}) vs eager: {tokens.shape[0]} prompts of "
                            f"{tokens.shape[1]} bytes + {steps} steps")
        for column in ("threshold", "result", "max |logit err|", "max state err", "min atol",
                       "near flips", "near ties", "far flips", "compared", "KV fraction"):
            table.add_column(column, justify="right")
        for r in report.rows:
            label = f"{r.threshold:g}" if isinstance(r.threshold, float) else "own"
            table.add_row(label, "[green]pass[/]" if r.passed else "[red]FAIL[/]", f"{r.max_abs_err:.2e}",
                          f"{r.max_state_err:.2e}", f"{r.min_atol:.2e}", str(r.near_flips), str(r.near_ties),
                          str(r.far_flips), f"{r.compared_sequences}/{r.sequences}", f"{r.kv_fraction:.3f}")
        out.print(table)
        for r in report.rows:
            for failure in r.failures[:5]:
                out.print(f"{r.threshold}: {failure}", markup=False)
        out.print(f"smallest atol that passes at rtol {report.rtol:g}: {report.to_dict()['min_atol']:.3g}")
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--artifact", type=click.Path(path_type=str), default=None,
              help="An artifact folder: its capacity and dtype are used. ONNX Runtime: a real prefill + decode of "
                   "--context bytes at 3 thresholds checks the prediction against the memory it holds (slow: about "
                   "15 s per threshold at 8192). TensorRT: each engine's device memory plus the I/O buffers.")
@click.option("--context", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Sequence length (prompt + generated) to size for.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences decoded at once.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Weights and state dtype (default: the artifact's, else fp32).")
@click.option("--thresholds", "thresholds_text", default=None,
              help="Thresholds for every layer, comma-separated, e.g. 0.3,0.5,0.8.")
@click.option("--sweep", is_flag=True, help="Sweep 0 to 1.2 (the default when --thresholds is not given).")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Text file to measure fill and quality on (default: the bundled held-out pydoc topics).")
@click.option("--budget", default=None, help="Memory budget, e.g. 512MiB, 4GiB, 1.5GB (units B, KiB, MiB, GiB, "
                                             "TiB, KB, MB, GB, TB).")
@click.option("--window", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Bytes per document for the measured fill (capped at --context; longer is more accurate and "
                   "slower: 8192 x 5 documents takes ~20 s per threshold on 2 CPU cores).")
@click.option("--docs", type=click.IntRange(min=1), default=None,
              help="Documents (windows spread over the data, or recall sequences) to measure on [default: 4; 16 "
                   "with --task recall].")
@click.option("--task", type=click.Choice(["text", "recall"]), default="text", show_default=True,
              help="text: the fill and bits per byte of the data; recall: of sequences of the associative-recall task "
                   "the model was trained on (the data as distractor), quality = exact-match accuracy, and the "
                   "budget's choice is the most accurate threshold that fits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write a PNG of memory and quality against threshold (needs matplotlib).")
@_user_errors
def memory(model: str, artifact: str | None, context: int, batch: int, dtype: str | None,
           thresholds_text: str | None, sweep: bool, data: str | None, budget: str | None, window: int,
           docs: int | None, task: str, as_json: bool, plot: str | None) -> None:
    """Memory per threshold at a context and batch: measured cache fill, bytes, quality; the choice for a budget."""
    from rich.progress import Progress

    from .backends import read_manifest
    from .core import checkpoint
    from .core.data import pydoc_corpus, read_text_file
    from .errors import InputError
    from .memory.report import SWEEP, memory_report, parse_thresholds, plot_report
    from .memory.units import format_size, parse_size
    from .memory.verify import TOLERANCE, verify_ort

    if sweep and thresholds_text is not None:
        raise InputError("give --thresholds or --sweep, not both")
    thresholds = parse_thresholds(thresholds_text) if thresholds_text is not None else list(SWEEP)
    budget_bytes = parse_size(budget, "--budget") if budget is not None else None
    if plot is not None:
        _writable(plot, "file")
    ckpt = checkpoint.load(model)
    capacity = None
    if artifact is not None:
        manifest = read_manifest(artifact)
        manifest.check_weights(ckpt.model)  # a measurement of other weights would mean nothing: exit 2
        capacity = manifest.capacity
        if dtype is not None and dtype != manifest.dtype:
            raise InputError(f"--dtype {dtype} differs from the artifact's {manifest.dtype}")
        dtype = manifest.dtype
    dtype = dtype or "fp32"
    text, source = (read_text_file(data), data) if data else (pydoc_corpus().held_out, "held-out pydoc topics")
    recall = None
    docs = docs or (16 if task == "recall" else 4)
    if task == "recall":
        import dataclasses

        from .memory.fill import Answers
        from .train.recall import recall_documents, trained_task

        recall_task, seed, length = trained_task(ckpt.metadata), 1234, min(window, context)
        tokens, targets = recall_documents(recall_task, text, length, docs, seed)
        recall = (tokens, Answers(targets, recall_task.value_len),
                  {"name": "recall", **dataclasses.asdict(recall_task), "context": length, "seed": seed})
        source = f"recall sequences in {source}"
    with Progress(console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        available = docs if recall else min(docs, max(1, (len(text) - 1) // min(window, context)))
        bar_task = bar.add_task("measuring fill", total=available * (len(thresholds) + 1))
        report = memory_report(ckpt.model, text, context, batch, dtype, thresholds, budget_bytes, window, docs,
                               str(ckpt.path), source, progress=lambda n: bar.advance(bar_task, n), recall=recall)
    if artifact is not None and manifest.backend == "tensorrt":
        from .memory.engine import tensorrt_memory

        report.engine = tensorrt_memory(manifest, batch, context)
    elif artifact is not None:
        scalar = sorted(set(thresholds))
        picks = sorted({scalar[0], scalar[len(scalar) // 2], scalar[-1]})
        expected = {r.threshold: r.fill.expected_per_layer for r in report.rows}
        report.verification = verify_ort(artifact, text, context, picks, batch, expected_fill=expected)
    if plot:
        plot_report(report, plot)
    result = report.to_dict()
    failed = _memory_failures(report)
    if as_json:
        _emit_json(result)
        if failed:
            click.echo(f"error: {failed}", err=True)
            sys.exit(1)
        return
    table = Table(title=f"{ckpt.path}: memory at context {context:,}, batch {batch}, {dtype} (fill measured on "
                        f"{source}, {report.documents} documents of {report.window} bytes)")
    for column in ("threshold", "KV fraction", "p10-p90", "capacity", "KV bytes", "fixed state", "weights",
                   "workspace", "total", "bits/byte", "vs own", *(("recall",) if recall else ()), "fits"):
        table.add_column(column, justify="right")
    for row in [*report.rows, report.own]:
        spread = row.fill.spread()
        table.add_row(row.label, f"{row.fill.fraction:.4f}", f"{spread['p10']:.3f}-{spread['p90']:.3f}",
                      f"{row.memory.capacity:,}", format_size(row.memory.kv_bytes),
                      format_size(row.memory.state_bytes), format_size(row.memory.weights_bytes),
                      format_size(row.memory.workspace_bytes), format_size(row.memory.total_bytes),
                      f"{row.bits_per_byte:.4f}", f"{row.delta_bits_per_byte:+.4f}",
                      *((f"{row.recall_accuracy:.3f}",) if recall else ()),
                      "" if row.fits is None else ("[green]yes[/]" if row.fits else "[red]no[/]"))
    out.print(table)
    check = report.extrapolation_check
    out.print(f"extrapolation check: fitting positions up to {check['fit_window']} predicts the cached fraction at "
              f"{check['predict_at']} within {check['mean_abs_error']:.3f} (mean), {check['max_abs_error']:.3f} (max)")
    if capacity is not None:
        out.print(f"the artifact's capacity is {capacity:,}: it allocates that much cache whatever the threshold")
    if report.budget is not None:
        choice = report.budget
        if choice.best is not None:
            quality = (f"{choice.best.recall_accuracy:.3f} recall accuracy" if recall
                       else f"{choice.best.bits_per_byte:.4f} bits/byte")
            out.print(f"budget {format_size(choice.budget)}: {len(choice.fitting)} threshold(s) fit; best quality "
                      f"at tau={choice.best.label} ({quality}): build with "
                      f"--max-cache {choice.best.memory.capacity} (margin {format_size(choice.margin)})")
        else:
            out.print(f"[red]budget {format_size(choice.budget)}: no threshold fits[/]; a fixed cache of "
                      f"{choice.safe_capacity} entries with --policy evict does")
        comparison = report.policy_comparison or {}
        if recall and comparison:
            line = ", ".join(f"{k} {comparison[k]['recall_accuracy']:.3f}" for k in ("threshold", "evict", "drop")
                             if k in comparison)
            out.print(f"recall accuracy at the same memory: {line} (threshold: the choice, a cache that grows; "
                      f"evict, drop: own thresholds, capacity {comparison['capacity_in_window']} in the window)")
        elif "evict_cost_bits_per_byte" in comparison:
            out.print(f"budget-safe alternative: own thresholds + evict at the same memory: "
                      f"{comparison['evict']['bits_per_byte']:.4f} bits/byte "
                      f"({comparison['evict_cost_bits_per_byte']:+.4f} vs the threshold; drop: "
                      f"{comparison['drop']['bits_per_byte']:.4f})")
        elif comparison:
            out.print(f"evict at that capacity: {comparison['evict']['bits_per_byte']:.4f} bits/byte; drop: "
                      f"{comparison['drop']['bits_per_byte']:.4f}")
    if report.engine is not None:
        e = report.engine
        out.print(f"TensorRT engines ({e['tensorrt_version']}, {e['gpu']}): scratch "
                  + ", ".join(f"{k} {format_size(v)}" for k, v in e["engine_scratch_bytes"].items())
                  + f"; state {format_size(e['state_bytes'])}; head outputs up to "
                  f"{format_size(max(e['head_bytes'].values()))}; plans {format_size(e['plan_bytes'])}; total "
                  f"{format_size(e['total_bytes_shared_scratch'])} with one shared scratch buffer "
                  f"({format_size(e['total_bytes_separate_scratch'])} with one per engine)")
    for v in report.verification or []:
        out.print(f"ONNX Runtime at tau={v['threshold']:g}: predicted {format_size(v['predicted_bytes'])}, measured "
                  f"{format_size(v['measured_bytes'])} (state {format_size(v['state_bytes'])} + decode peak "
                  f"{format_size(v['decode_peak_bytes'])}): {100 * v['relative_difference']:+.2f}%"
                  + (f" ({format_size(v['unmodelled_bytes'])} of ONNX Runtime's fixed step allocations, not modelled,"
                     f" within the {format_size(v['runtime_allowance_bytes'])} allowance)"
                     if v["within_tolerance"] and abs(v["relative_difference"]) > TOLERANCE else "")
                  + f", cache lengths {v['cache_length_per_layer']}")
    if plot:
        out.print(f"wrote {plot}")
    if failed:
        click.echo(f"error: {failed}", err=True)
        sys.exit(1)


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--context", type=click.IntRange(min=1), default=16384, show_default=True,
              help="The sequence length the caches are filled for.")
@click.option("--fill", "fills", multiple=True,
              help="How full the caches are: own (each artifact's own thresholds, at the fill text gives them: "
                   "measured with --model where a threshold routes on the text), -1 (every token cached: the dense "
                   "cost), 3 (none: pure GDN), or a fraction in [0, 1]. Repeat for several; default: -1, own, 3.")
@click.option("--batch", "batches", type=click.IntRange(min=1, max=64), multiple=True,
              help="Sequences decoded at once; repeat for several (default 1).")
@click.option("--prompt", type=click.IntRange(min=1, max=65536), default=1024, show_default=True,
              help="Prompt bytes of the prefill measurement.")
@click.option("--warmup", type=click.IntRange(min=0, max=10000), default=5, show_default=True,
              help="Decode steps run before timing, per configuration.")
@click.option("--iterations", type=click.IntRange(min=1, max=100000), default=60, show_default=True,
              help="Timed decode steps per configuration.")
@click.option("--repeats", type=click.IntRange(min=1, max=100), default=3, show_default=True,
              help="Rounds the timed steps are split into, every configuration in turn (interleaved).")
@click.option("--model", type=click.Path(path_type=str), default=None,
              help="The checkpoint of the artifacts, for --fill own (its fill is measured on held-out text).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also write the report as JSON to this file ('-': stdout, instead of the tables).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also draw the decode rows (median, p90, floor) into this PNG (needs matplotlib).")
@click.option("--markdown", is_flag=True, help="Print the tables as Markdown.")
@_user_errors
def bench(artifacts: tuple[str, ...], context: int, fills: tuple[str, ...], batches: tuple[int, ...], prompt: int,
          warmup: int, iterations: int, repeats: int, model: str | None, json_file: str | None,
          plot: str | None, markdown: bool) -> None:
    """Decode latency and prefill throughput of artifacts, against the first configuration of the same run."""
    from rich.progress import Progress

    from .bench import bench as run_bench
    from .bench import parse_fill
    from .errors import InputError
    from .memory.units import format_size

    if context > MAX_CAPACITY * 64:
        raise InputError(f"--context must be at most {MAX_CAPACITY * 64}, got {context}")
    if json_file not in (None, "-"):
        _writable(json_file, "file")
    if plot is not None:
        _writable(plot, "file")

    loaded = {}

    def measure(runner) -> list[float]:
        """The fill of --model at the runner's own thresholds, per layer, as the memory report measures it."""
        from .core import checkpoint
        from .core.data import pydoc_corpus
        from .memory import fill as fl
        from .memory.report import DEFAULT_DOCS, DEFAULT_WINDOW

        if "model" not in loaded:
            loaded["model"] = checkpoint.load(model).model
        runner.manifest.check_weights(loaded["model"])  # another model's fill would mean nothing: exit 2
        docs = fl.documents(pydoc_corpus().held_out, min(DEFAULT_WINDOW, context), DEFAULT_DOCS)
        prediction = fl.predict_fill(fl.measure_fill(loaded["model"], docs, [None])[0], context)
        return [min(1.0, e / context) for e in prediction.expected_per_layer]

    fills = fills or ("-1", "own", "3")
    parsed = [parse_fill(f) for f in fills]
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("benchmarking", total=None)
        report = run_bench(artifacts, context, parsed, batches or (1,), prompt, warmup, iterations, repeats,
                           progress=lambda done, total: bar.update(task, completed=done, total=total),
                           measure=measure if model else None)
    if plot is not None:
        from .bench import plot as plot_bench

        plot_bench(report, plot)
    if json_file is not None:
        text = json.dumps(report.to_dict(), indent=2)
        if json_file == "-":
            click.echo(text)
            return
        target = Path(json_file)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, target)  # whole or not at all
    if markdown:
        from .bench import markdown as bench_markdown

        click.echo(bench_markdown(report))
        click.echo(f"\nread bandwidth {report.bandwidth_bytes_per_s / 1e9:.1f} GB/s; process peak "
                   f"{format_size(report.peak_rss_bytes)}")
        return
    table = Table(title=f"decode at context {context}: step time over {iterations} steps per row, {repeats} "
                        f"interleaved rounds; ratios against the first row")
    for column in ("artifact", "backend", "fill", "cached", "batch", "median ms", "p90", "p99", "spread",
                   "ratio", "of floor", "state"):
        table.add_column(column, justify="right" if column not in ("artifact", "backend") else "left")
    for r in report.decode:
        table.add_row(r.artifact, r.backend, r.fill, f"{r.entries:,}", str(r.batch), f"{r.median_ms:.3f}",
                      f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}", f"±{r.spread_ms:.3f}", f"{r.ratio:.2f}x",
                      "" if r.of_floor is None else f"{r.of_floor:.2f}x", format_size(r.state_bytes))
    out.print(table)
    table = Table(title=f"prefill of a {prompt}-byte prompt; ratios of throughput against the first row")
    for column in ("artifact", "backend", "batch", "median ms", "tokens/s", "ratio"):
        table.add_column(column, justify="right" if column not in ("artifact", "backend") else "left")
    for r in report.prefill:
        table.add_row(r.artifact, r.backend, str(r.batch), f"{r.median_ms:.2f}", f"{r.tokens_per_s:,.0f}",
                      f"{r.ratio:.2f}x")
    out.print(table)
    out.print(f"read bandwidth (a sum over 256 MiB): {report.bandwidth_bytes_per_s / 1e9:.1f} GB/s; floor = the "
              f"same batch's step with an empty cache + the keys and values read / bandwidth; process peak "
              f"{format_size(report.peak_rss_bytes)}", markup=False)
    for r in report.decode:
        out.print(r.command, markup=False)


def _memory_failures(report) -> str:
    """Why ``memory`` exits 1, in one line ("" when it does not): no threshold fits the budget, or the memory an
    artifact held differs from the prediction by more than the tolerance."""
    from .memory.units import format_size
    from .memory.verify import RUNTIME_ALLOWANCE_BYTES, TOLERANCE

    reasons = []
    if report.budget is not None and report.budget.best is None:
        reasons.append(f"no threshold fits the budget of {format_size(report.budget.budget)}")
    off = [v for v in report.verification or [] if not v["within_tolerance"]]
    if off:
        reasons.append("the memory the artifact held differs from the prediction by more than "
                       f"{100 * TOLERANCE:g}% (and by more than ONNX Runtime's fixed step allocations, "
                       f"{format_size(RUNTIME_ALLOWANCE_BYTES)}) at " + ", ".join(f"tau={v['threshold']:g} "
                                                             f"({100 * v['relative_difference']:+.1f}%)" for v in off))
    return "; ".join(reasons)


if __name__ == "__main__":
    main()
