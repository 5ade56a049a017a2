"""The two deployable programs of a HAM model, and their ``torch.export``.

- ``prefill``: tokens [B, T] int64, thresholds [L] float32 -> logits [B, T, vocab], scores / routed [L, B, T],
  overflow [L, B] int64, and the state of every layer;
- ``decode``: token [B] int64, thresholds [L] float32, the state of every layer -> logits [B, vocab], scores /
  routed [L, B, 1], overflow [L, B], and the new state.

The state of layer i is the six tensors of :class:`ham_export.core.model.LayerState`, flattened in field order and
named ``past.i.<field>`` (inputs) / ``present.i.<field>`` (outputs). The cache capacity C and the overflow policy
are fixed per program; batch and prompt length are dynamic; the thresholds are a runtime input, so one program
serves every threshold. Every state output is a new tensor: nothing is mutated in place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import HAMConfig
from ..core.model import HAMLM, LayerState
from ..errors import InputError
from .manifest import Program, TensorInfo

STATE_FIELDS = LayerState._fields
HEAD_OUTPUTS = ("logits", "scores", "routed", "overflow")
MAX_BATCH = 4096
MAX_TOKENS = 1 << 20


def state_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{field}" for i in range(n_layers) for field in STATE_FIELDS]


def flatten_state(state: list[LayerState]) -> list[torch.Tensor]:
    return [tensor for layer in state for tensor in layer]


def unflatten_state(flat: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[LayerState]:
    n = len(STATE_FIELDS)
    if len(flat) % n:
        raise InputError(f"a flat state has a multiple of {n} tensors, got {len(flat)}")
    return [LayerState(*flat[i: i + n]) for i in range(0, len(flat), n)]


def _head(logits: torch.Tensor, routes) -> tuple[torch.Tensor, ...]:
    return (logits, torch.stack([r.score for r in routes]), torch.stack([r.routed for r in routes]),
            torch.stack([r.overflow for r in routes]))


class PrefillProgram(nn.Module):
    """Prompt from an empty state: (tokens, thresholds) -> (logits, scores, routed, overflow, *state)."""

    def __init__(self, model: HAMLM, capacity: int, policy: str) -> None:
        super().__init__()
        self.model, self.capacity, self.policy = model, capacity, policy

    def forward(self, tokens: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight = self.model.embed.weight
        state = [layer.init_state(tokens.shape[0], self.capacity, weight.device, weight.dtype)
                 for layer in self.model.layers]
        logits, state, routes = self.model.run_with_state(tokens, state, thresholds, self.policy, decode=False)
        return (*_head(logits, routes), *flatten_state(state))


class DecodeProgram(nn.Module):
    """One token: (token, thresholds, *state) -> (logits, scores, routed, overflow, *new state)."""

    def __init__(self, model: HAMLM, capacity: int, policy: str) -> None:
        super().__init__()
        self.model, self.capacity, self.policy = model, capacity, policy

    def forward(self, token: torch.Tensor, thresholds: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state, routes = self.model.run_with_state(token, unflatten_state(state), thresholds,
                                                              self.policy, decode=True)
        return (*_head(logits, routes), *flatten_state(new_state))


def example_state(model: HAMLM, batch: int, capacity: int) -> list[torch.Tensor]:
    weight = model.embed.weight
    return flatten_state(model.init_state(batch, capacity, weight.device, weight.dtype))


def export_programs(model: HAMLM, capacity: int, policy: str) -> dict[str, torch.export.ExportedProgram]:
    """``torch.export`` the prefill and decode programs with dynamic batch and prompt length."""
    if capacity < 1:
        raise InputError(f"the cache capacity must be at least 1, got {capacity}")
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    thresholds = torch.tensor(model.cfg.thresholds, dtype=torch.float32)
    example_tokens = torch.zeros(2, 3, dtype=torch.int64)
    with torch.no_grad():
        prefill = torch.export.export(
            PrefillProgram(model, capacity, policy), (example_tokens, thresholds),
            dynamic_shapes=({0: batch, 1: tokens}, None))
        state = example_state(model, 2, capacity)
        decode = torch.export.export(
            DecodeProgram(model, capacity, policy), (example_tokens[:, 0].contiguous(), thresholds, *state),
            dynamic_shapes=({0: batch}, None, tuple({0: batch} for _ in state)))
    return {"prefill": prefill, "decode": decode}


def describe(cfg: HAMConfig, capacity: int, dtype: str) -> dict[str, dict[str, list[TensorInfo]]]:
    """Names, dtypes, symbolic shapes and meanings of both programs' inputs and outputs."""
    n, h, dk, dv = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.head_dim_v
    dtype = {"fp32": "float32", "fp16": "float16"}[dtype]
    shapes = {
        "ssm": (["B", h, dk, dv], "GDN state S"),
        "conv": (["B", cfg.conv_width - 1, cfg.qkv_channels], "last W-1 pre-conv rows of [q | k | v]"),
        "k_cache": (["B", h, capacity, dk], "cached keys; entries past length are undefined"),
        "v_cache": (["B", h, capacity, dv], "cached values"),
        "score_cache": (["B", capacity], "router score of each cached entry"),
        "length": (["B"], "valid cache entries"),
    }

    def state(prefix: str) -> list[TensorInfo]:
        return [TensorInfo(f"{prefix}.{i}.{f}", "int64" if f == "length" else dtype, tuple(shapes[f][0]),
                           f"layer {i}: {shapes[f][1]}") for i in range(n) for f in STATE_FIELDS]

    def head(t: str | int) -> list[TensorInfo]:
        logits_shape = ("B", "T", cfg.vocab_size) if t == "T" else ("B", cfg.vocab_size)
        return [
            TensorInfo("logits", dtype, logits_shape, "next-token logits"),
            TensorInfo("scores", dtype, (n, "B", t), "router score per layer and token (cached iff >= threshold)"),
            TensorInfo("routed", "bool", (n, "B", t), "route decision per layer and token"),
            TensorInfo("overflow", "int64", (n, "B"), "routed tokens that found the cache full (policy applied); "
                                                      "-1: a row refused for a cache length outside [0, C]"),
        ]

    thresholds = TensorInfo("thresholds", "float32", (n,), "tau per layer; a token is cached iff score >= tau")
    return {
        "prefill": {
            "inputs": [TensorInfo("tokens", "int64", ("B", "T"), "prompt byte ids"), thresholds],
            "outputs": head("T") + state("present"),
        },
        "decode": {
            "inputs": [TensorInfo("token", "int64", ("B",), "one byte id per sequence"), thresholds,
                       *state("past")],
            "outputs": head(1) + state("present"),
        },
    }


def program_table(model: HAMLM, capacity: int, dtype: str, files: dict[str, str],
                  model_names: dict[str, str] | None = None) -> dict[str, Program]:
    """The manifest's ``programs``: for prefill and decode, the file (and model name) and every input and output."""
    described = describe(model.cfg, capacity, dtype)
    return {name: Program(files[name], tuple(io["inputs"]), tuple(io["outputs"]),
                          (model_names or {}).get(name))
            for name, io in described.items()}


def check_graph(manifest, program: str, inputs: list[tuple], outputs: list[tuple], outputs_only: bool = False
                ) -> None:
    """Refuse a program whose graph is not the one the manifest's fields describe (a capacity, a dtype or a layer
    count that lies, a decode file that is the prefill's): ``inputs`` and ``outputs`` are ``(name, dtype name,
    shape)`` as the runtime reports them, each dim a number or a symbol (or None); ``outputs_only``: what a run
    gave, the inputs unknown."""
    from .manifest import ArtifactError

    expected = describe(manifest.model, manifest.capacity, manifest.dtype)[program]
    path = manifest.path(program)
    kinds = [("inputs", inputs, expected["inputs"])] if not outputs_only else []
    for kind, got, want in (*kinds, ("outputs", outputs, expected["outputs"])):
        names, wanted = [g[0] for g in got], [w.name for w in want]
        if names != wanted:
            first = next((i for i, (a, b) in enumerate(zip(names, wanted, strict=False)) if a != b),
                         min(len(names), len(wanted)))
            raise ArtifactError(f"{path} is not the {program} program its manifest describes: {kind} {len(names)}, "
                                f"expected {len(wanted)}; #{first} is {names[first] if first < len(names) else None!r}"
                                f", expected {wanted[first] if first < len(wanted) else None!r}")
        for (name, dtype, shape), info in zip(got, want, strict=True):
            if dtype != info.dtype:
                raise ArtifactError(f"{path}: {name} is {dtype} in the graph; the manifest (dtype "
                                    f"{manifest.dtype}) says {info.dtype}")
            if len(shape) != len(info.shape) or any(isinstance(g, int) and isinstance(w, int) and g != w
                                                    for g, w in zip(shape, info.shape, strict=False)):
                raise ArtifactError(f"{path}: {name} has shape {list(shape)} in the graph; the manifest (capacity "
                                    f"{manifest.capacity}) says {list(info.shape)}")


def check_exported_program(manifest, program: str, exported) -> None:
    """:func:`check_graph` for a ``torch.export.ExportedProgram``: its user inputs and outputs, by position (their
    names are torch's), with the dtypes and shapes its graph records (a symbolic dim as None)."""

    def info(values, expected) -> list[tuple]:
        rows = []
        for i, value in enumerate(values):
            val = getattr(value, "meta", {}).get("val")
            name = expected[i].name if i < len(expected) else f"#{i}"
            if not isinstance(val, torch.Tensor):
                rows.append((name, type(val).__name__, ()))
                continue
            rows.append((name, str(val.dtype).removeprefix("torch."),
                         tuple(d if isinstance(d, int) else None for d in val.shape)))
        return rows

    expected = describe(manifest.model, manifest.capacity, manifest.dtype)[program]
    nodes = {node.name: node for node in exported.graph.nodes}
    inputs = [nodes[name] for name in exported.graph_signature.user_inputs]
    output = next(node for node in exported.graph.nodes if node.op == "output")
    outputs = list(output.args[0])[:len(exported.graph_signature.user_outputs)]
    check_graph(manifest, program, info(inputs, expected["inputs"]), info(outputs, expected["outputs"]))
