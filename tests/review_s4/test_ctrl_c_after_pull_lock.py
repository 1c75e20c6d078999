"""Review s4, finding: Ctrl-C can hang a sync caller for good (HIGH).

`SyncFlight.consume` (chengeta_ai/layers/fanout.py) runs, once per chunk::

    if pull_lock.acquire(blocking=False):
        try:
            ... pull_one(consumer) ...
        finally:
            pull_lock.release()

CPython runs pending signal handlers at the end of a ``CALL`` (the eval breaker): a Ctrl-C that
arrives while the thread is in, or just before, ``acquire`` raises ``KeyboardInterrupt`` right
after ``acquire`` returned True and *before* the ``try``. The pull lock stays held; the
consumer's ``finally`` then leaves the flight, which (``on_abandon="cancel"``, the only consumer)
calls `SyncFlight.cancel_upstream`, whose ``with self._pull_lock:`` blocks forever on the lock
this same thread holds. The program does not stop on Ctrl-C: it hangs (a second Ctrl-C or a
kill is needed), and any other thread sharing the flight would wait forever too.

Found with real SIGINTs: a script streaming misses in a loop, sent one SIGINT at a random
moment, hung in 2 runs out of 15 with the stack ``consume -> perform -> cancel_upstream``
(line ``with self._pull_lock``). Reproduced here deterministically: a profile hook raises
``KeyboardInterrupt`` on the return of that ``acquire`` call, exactly where the eval breaker
raises it. A watchdog thread releases the lock after 10 s so that the suite itself never hangs,
and records that it had to.

Fix direction: take the lock in a form that cannot be split from its ``try`` (``with
pull_lock:`` after a non-blocking check, or ``acquire`` inside the ``try`` with a flag), and
never re-acquire the pull lock in a path that the holder itself can reach (`cancel_upstream`
from a consumer's ``finally``): e.g. an ``RLock`` or passing "lock held" down.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from chengeta_ai import CacheManager
from chengeta_ai.layers.fanout import SyncFlight
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

WANT = [f"chunk {i}" for i in range(50)]


def _upstream(messages: Any) -> Iterator[str]:
    return iter(WANT)


class CtrlCAfterAcquire:
    """A profile hook: ``KeyboardInterrupt`` on the return of the ``nth`` ``acquire`` call made
    by `SyncFlight.consume` (where CPython's eval breaker delivers a pending SIGINT)."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.seen = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if (
            event == "c_return"
            and frame.f_code.co_name == "consume"
            and getattr(arg, "__name__", "") == "acquire"
        ):
            self.seen += 1
            if self.seen == self.nth:
                sys.setprofile(None)
                raise KeyboardInterrupt


class Watchdog:
    """Unblocks a hung main thread (releases every sync flight's held pull lock) after
    ``timeout`` seconds; `fired` says whether it had to."""

    def __init__(self, timeout: float) -> None:
        self.done = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self._thread.start()

    def _run(self, timeout: float) -> None:
        if self.done.wait(timeout):
            return
        self.fired = True
        for obj in gc.get_objects():
            if isinstance(obj, SyncFlight):
                lock = obj._pull_lock
                while getattr(lock, "locked", lambda: False)() or repr(lock).startswith("<locked"):
                    try:
                        lock.release()
                    except RuntimeError:  # an RLock held by another thread
                        break

    def stop(self) -> None:
        self.done.set()
        self._thread.join()


@pytest.mark.parametrize("nth", [1, 2, 10, 37])
def test_ctrl_c_right_after_the_pull_lock_is_taken_does_not_hang(
    nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the Python step, whose `acquire` calls the hook sees (`SoloPull` calls it from Rust,
    # where no Python code runs between the acquire and the step)
    monkeypatch.setattr(SyncFlight, "solo_pull", False)
    cache = StreamingResponseCache(CacheManager())
    got: list[str] = []
    interrupted = False
    watchdog = Watchdog(10.0)
    try:
        sys.setprofile(CtrlCAfterAcquire(nth))
        try:
            for chunk in cache.get_or_stream(["review s4: ctrl-c"], _upstream):
                got.append(chunk)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.setprofile(None)
    finally:
        watchdog.stop()
    assert interrupted
    # observed on main: the caller hung in cancel_upstream (`with self._pull_lock`) until the
    # watchdog released the lock
    assert not watchdog.fired, "Ctrl-C hung the caller: the pull lock was left held"
    # and the key is usable again
    assert list(cache.get_or_stream(["review s4: ctrl-c"], _upstream)) == WANT
