"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import signal

import pytest

# A test run started in the background by a shell without job control inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C tests (which
# raise SIGINT in this process and in the workers it starts) need the usual one.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    """Each test sees its own first warning of every cause (warnings are rate-limited)."""
    from chengeta_ai.logs import reset_warnings

    reset_warnings()
