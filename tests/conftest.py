"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    """Each test sees its own first warning of every cause (warnings are rate-limited)."""
    from chengeta_ai.logs import reset_warnings

    reset_warnings()
