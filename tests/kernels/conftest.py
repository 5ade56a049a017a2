"""Kernel tests: keep TRITON_INTERPRET=1 set while each test runs (see ``support.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Keep the variable set while a kernel runs (the interpreter imports parts of Triton lazily) and only then."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
