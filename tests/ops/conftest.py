"""The op suites: parametrize a test over every implementation of its op (``impl``) and every case (``case``)."""

from __future__ import annotations

import pytest


def available(impl) -> None:
    """Skip the calling test, with the reason, when this machine cannot run ``impl``."""
    reason = impl.unavailable()
    if reason is not None:
        pytest.skip(f"{impl.name}: {reason}")


def takes(impl, case) -> None:
    """Skip when ``impl`` has no kernel for ``case`` (a dtype, or a shape like T > 1 for a decode kernel)."""
    reason = impl.rejects(case)
    if reason is not None:
        pytest.skip(reason)
