"""The prompts a check runs: held-out snippets of the bundled corpus, or the lines of a file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError

PROMPT_BYTES = 48
MAX_PROMPT_BYTES = 4096
MAX_PROMPTS = 64


def default_prompts(count: int = 3) -> torch.Tensor:
    """``count`` snippets of the held-out text, PROMPT_BYTES each, from spread-out places: [count, PROMPT_BYTES]."""
    from ..core.data import pydoc_corpus

    text = pydoc_corpus().held_out
    stride = (len(text) - PROMPT_BYTES) // count
    return torch.tensor([list(text[i * stride: i * stride + PROMPT_BYTES]) for i in range(count)])


def read_prompts(path: str | Path) -> torch.Tensor:
    """One prompt per non-empty line of a UTF-8 file (at most :data:`MAX_PROMPTS`), cut to the shortest one and to
    :data:`MAX_PROMPT_BYTES`: [lines, bytes]."""
    from ..core.data import read_text_file

    lines = [line.encode("utf-8") for line in read_text_file(path).decode("utf-8", "replace").splitlines()
             if line.strip()]
    if not lines:
        raise InputError(f"{path} holds no prompt (one per non-empty line)")
    if len(lines) > MAX_PROMPTS:
        raise InputError(f"{path} holds {len(lines):,} prompts; a check takes at most {MAX_PROMPTS} (one a line)")
    length = min(min(len(line) for line in lines), MAX_PROMPT_BYTES)
    return torch.tensor([list(line[:length]) for line in lines])
