"""Warnings on the ``chengeta_ai`` logger, rate-limited per cause.

A cache that steps aside on every failure could otherwise log once per request when a backend
is down. `warn` logs the first warning of a cause at once, then at most one per
`WARN_INTERVAL` seconds for that cause; the next one that gets through says how many were
suppressed meanwhile. The cause is the message template (``"backend %s failed for %s: %r"``),
optionally refined by ``cause=``: different templates never silence each other.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["WARN_INTERVAL", "logger", "reset_warnings", "warn"]

logger = logging.getLogger("chengeta_ai")

#: Seconds between two warnings of one cause.
WARN_INTERVAL = 60.0

_lock = threading.Lock()
#: cause -> (monotonic time of the last warning logged, warnings suppressed since)
_last: dict[str, tuple[float, int]] = {}
#: Bound on the causes remembered (a cause with a key in it would grow this without end).
_MAX_CAUSES = 1024


def warn(msg: str, *args: Any, cause: str = "", level: int = logging.WARNING) -> None:
    """Logs ``msg % args`` on the ``chengeta_ai`` logger unless the same cause was logged
    within the last `WARN_INTERVAL` seconds (then it is counted, and reported with the next)."""
    if not logger.isEnabledFor(level):
        return
    key = f"{cause}|{msg}"
    now = time.monotonic()
    with _lock:
        last = _last.get(key)
        if last is not None and now - last[0] < WARN_INTERVAL:
            _last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(_last) >= _MAX_CAUSES:
            _last.clear()
        suppressed = last[1] if last is not None else 0
        _last[key] = (now, 0)
    if suppressed:
        msg = f"{msg} ({suppressed} similar warnings suppressed in the last %.0f s)"
        args = (*args, WARN_INTERVAL)
    logger.log(level, msg, *args)


def reset_warnings() -> None:
    """Forgets every cause (tests call it so that each test sees its own first warning)."""
    with _lock:
        _last.clear()
