"""`PullLock` (Rust): a sync flight's pull lock, with `threading.RLock`'s semantics (issue 7,
item 4: `SoloPull` takes it per chunk without a call into Python).

Each behaviour the flight relies on, with real threads: reentrant holds owned by a thread,
non-blocking and blocking acquires (the GIL released while waiting, a timeout), a Ctrl-C
(SIGINT) interrupting a blocked main thread, mutual exclusion under contention.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

import pytest
from tests.helpers import held_in_another_thread

from chengeta_ai._core import PullLock


def in_thread(fn: Any) -> Any:
    """Runs ``fn`` in another thread; returns what it returned (or raises what it raised)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:
            out.append(("err", exc))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


def test_reentrant_holds_are_owned_by_the_thread() -> None:
    lock = PullLock()
    assert not lock.locked() and not lock._is_owned()
    assert lock.acquire(False)
    assert lock.acquire()  # again, blocking: this thread holds it
    assert lock.locked() and lock._is_owned()
    assert in_thread(lambda: (lock._is_owned(), lock.acquire(False))) == (False, False)
    lock.release()
    assert lock._is_owned(), "one hold left"
    assert in_thread(lambda: lock.acquire(False)) is False
    lock.release()
    assert not lock.locked() and not lock._is_owned()
    with pytest.raises(RuntimeError, match="un-acquired"):
        lock.release()


def test_only_the_holder_may_release() -> None:
    lock = PullLock()
    with lock:
        with pytest.raises(RuntimeError, match="un-acquired"):
            in_thread(lock.release)
        assert lock._is_owned()
    assert not lock.locked()


def test_arguments_as_rlock() -> None:
    lock = PullLock()
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(False, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        lock.acquire(timeout=-2)
    assert lock.acquire(blocking=False)
    assert lock.acquire(timeout=0)
    lock.release()
    lock.release()
    assert "unlocked" in repr(lock)


def test_a_blocking_acquire_waits_without_the_gil_until_the_holder_releases() -> None:
    lock = PullLock()
    held = threading.Event()
    ticks = 0

    def holder() -> None:
        nonlocal ticks
        with lock:
            held.set()
            # Python code (it needs the GIL) while the main thread waits for the lock
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                ticks += 1
                time.sleep(0.001)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    assert lock.acquire(timeout=10)  # a wait that kept the GIL would starve the holder
    try:
        assert ticks > 0
        assert lock._is_owned()
    finally:
        lock.release()
    t.join(5)


def test_a_timed_acquire_gives_up() -> None:
    lock = PullLock()
    with held_in_another_thread(lock):
        assert lock.acquire(timeout=0.05) is False
        assert in_thread(lambda: lock.acquire(timeout=0.05)) is False  # not the main thread
        assert not lock._is_owned()
    assert lock.acquire(timeout=5)
    lock.release()


def test_mutual_exclusion_under_contention() -> None:
    lock = PullLock()
    inside = 0
    overlaps = 0
    total = 0

    def worker(blocking: bool) -> None:
        nonlocal inside, overlaps, total
        done = 0
        while done < 300:
            if not lock.acquire(blocking):
                continue
            try:
                inside += 1
                if inside > 1:
                    overlaps += 1
                if done % 10 == 0:
                    time.sleep(0)  # let the others try meanwhile
                total += 1
                inside -= 1
            finally:
                lock.release()
            done += 1

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == 0
    assert total == 1200
    assert not lock.locked()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
def test_ctrl_c_interrupts_a_blocked_main_thread() -> None:
    lock = PullLock()
    kill = ctypes.CDLL(None, use_errno=True).kill

    def interrupt() -> None:
        time.sleep(0.1)
        kill(os.getpid(), int(signal.SIGINT))

    with held_in_another_thread(lock):
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        sender = threading.Thread(target=interrupt)
        try:
            sender.start()
            with pytest.raises(KeyboardInterrupt):
                with lock:  # blocks: the holder never lets go before the interrupt
                    pytest.fail("acquired a lock another thread holds")
            assert not lock._is_owned()
        finally:
            signal.signal(signal.SIGINT, previous)
            sender.join(5)
    assert not lock.locked()
