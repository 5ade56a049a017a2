"""The device memory of a TensorRT artifact, from what TensorRT reported when it built the engines.

Per engine, ``device_memory_bytes`` is TensorRT's ``device_memory_size_v2``: the activations and scratch a context of
that engine needs (the maximum over its profiles). The application binds the I/O buffers itself: the state (the
caches at capacity, the GDN and conv state, the lengths) and each call's head outputs, sized here from the model. The
weights live inside the engines; the plan files' sizes stand for them. Two contexts that never run at once may share
one scratch buffer (``ExecutionContextAllocationStrategy.USER_MANAGED``), so the total takes the larger engine's
scratch, and also shows the sum.
"""

from __future__ import annotations

from typing import Any

from ..backends.manifest import Manifest
from ..errors import InputError
from . import sizes as mem


def tensorrt_memory(manifest: Manifest, batch: int, prompt: int) -> dict[str, Any]:
    """The TensorRT artifact's device memory at ``batch`` sequences and a prefill of ``prompt`` tokens."""
    info = manifest.options.get("tensorrt") or {}
    if info.get("state") != "built":
        raise InputError(f"{manifest.directory} holds no engines yet (prepared only): build them with "
                         f"bash {manifest.directory}/build_engines.sh")
    if batch > info["max_batch"]:
        raise InputError(f"--batch {batch} is more than the engines' profile allows ({info['max_batch']})")
    cfg, dtype = manifest.model, manifest.dtype
    engines = info["engines"]
    scratch = {name: int(e["device_memory_bytes"]) for name, e in engines.items()}
    plans = sum(int(e["file_bytes"]) for e in engines.values())
    state = mem.estimate(cfg, 0, batch, manifest.capacity, dtype, workspace=False)
    item = mem.dtype_bytes(dtype)
    prompt = min(prompt, info["max_prompt"])
    # logits in the dtype; scores in the dtype, routed (bool) and overflow (int64) per layer
    head = {"prefill": batch * prompt * (cfg.vocab_size * item + cfg.n_layers * (item + 1)) + cfg.n_layers * batch * 8,
            "decode": batch * (cfg.vocab_size * item + cfg.n_layers * (item + 1 + 8))}
    state_bytes = state.state_bytes + state.kv_bytes
    shared = max(scratch.values()) + state_bytes + max(head.values()) + plans
    return {"engine_scratch_bytes": scratch, "state_bytes": state_bytes, "head_bytes": head, "plan_bytes": plans,
            "total_bytes_shared_scratch": shared,
            "total_bytes_separate_scratch": shared - max(scratch.values()) + sum(scratch.values()),
            "batch": batch, "prompt": prompt, "tensorrt_version": info.get("version"), "gpu": info.get("gpu")}
