"""Text data and the byte-level tokenizer.

The bundled models are trained on real English that every CPython install ships: the documentation topics of
``pydoc_data.topics`` (the text behind ``help('if')`` and friends). Topics are split, not bytes, so that the held-out
text is whole documents the model never saw. The tokenizer is the identity on UTF-8 bytes (vocab 256).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

HELD_OUT_SHARE = 0.1  # about this share of the bytes, in whole topics spread over the alphabet, is held out


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids [N]."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def decode(tokens: torch.Tensor | list[int]) -> str:
    """Token ids back to text (invalid UTF-8 sequences are replaced)."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    return bytes(values).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    train: bytes
    held_out: bytes

    @property
    def held_out_sha256(self) -> str:
        return hashlib.sha256(self.held_out).hexdigest()


def pydoc_corpus() -> Corpus:
    """The pydoc topics, split by topic into train and held-out text."""
    from pydoc_data.topics import topics

    train, held = [], []
    seen = held_bytes = 0
    for name in sorted(topics):
        text = topics[name].strip() + "\n\n"
        seen += len(text)
        # A topic is held out while the held-out share, with it, stays within HELD_OUT_SHARE of the bytes seen.
        if held_bytes + len(text) <= HELD_OUT_SHARE * seen:
            held.append(text)
            held_bytes += len(text)
        else:
            train.append(text)
    return Corpus("".join(train).encode("utf-8"), "".join(held).encode("utf-8"))


def read_text_file(path: str | Path) -> bytes:
    """The bytes of a user's evaluation file, refused with a clear message when unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    data = path.read_bytes()
    if len(data) < 2:
        raise InputError(f"data file {path} holds {len(data)} bytes; need at least 2 to predict one")
    return data


def windows(data: bytes, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length + 1`` bytes (inputs and shifted targets): [N, length + 1].

    The last window is shorter when the data does not divide evenly; it is returned padded with -1 targets.
    """
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    n = -(-(tokens.numel() - 1) // length)
    out = torch.full((n, length + 1), -1, dtype=torch.int64)
    for i in range(n):
        chunk = tokens[i * length: i * length + length + 1]
        out[i, : chunk.numel()] = chunk
    return out
