"""Shared bench plumbing: smoke-mode detection and an end-of-session ratio summary.

Benchmarks call the ``summary`` fixture with one row per comparison (chengeta_ai figure,
baseline figure, ratio); the rows are printed as one table at the end of the session (also in
smoke mode, where the figures come from scaled-down runs and mean nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_ROWS: list[tuple[str, str, str, str]] = []


@pytest.fixture
def smoke(request: pytest.FixtureRequest) -> bool:
    """True under ``--benchmark-disable``: run every code path once, on small sizes."""
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture
def summary() -> Callable[..., None]:
    """``summary(name, ours, baseline, ratio)``: adds a row to the end-of-session table."""

    def add(name: str, ours: str, baseline: str, ratio: str) -> None:
        _ROWS.append((name, ours, baseline, ratio))

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    smoke = bool(terminalreporter.config.getoption("benchmark_disable", False))
    title = "chengeta_ai vs same-run baselines" + (" (SMOKE: sizes scaled down)" if smoke else "")
    header = ("benchmark", "chengeta_ai", "baseline", "ratio")
    widths = [max(len(r[i]) for r in [header, *_ROWS]) for i in range(4)]
    terminalreporter.write_sep("=", title)
    for row in [header, tuple("-" * w for w in widths), *_ROWS]:
        terminalreporter.write_line(
            " | ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
