"""Regression of s7-pump-lean (b7e190d); ``threading.RLock`` holds.

`PullLock` lets a blocked main thread run its signal handlers (Ctrl-C) by waiting in 20 ms
slices, and decides whether the waiting thread is the main one against ``MAIN_THREAD``, the
main thread's ident looked up once per process and kept in a static. A process forked from
another thread (``os.fork()`` / multiprocessing's "fork" start method called from a worker
thread) keeps that static, but its main thread is now the thread that forked: in the child,
a main thread waiting for a pull lock (``cancel_upstream``'s ``with pull_lock`` while another
thread reads a stalled upstream) is no longer interrupted by Ctrl-C; the KeyboardInterrupt
waits until the holder lets go (forever, if the upstream hangs). An RLock's wait is
interrupted at once in the same child.

A real fork and a real SIGINT, in a process of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import chengeta_ai

SCRIPT = textwrap.dedent(
    """
    import os
    import signal
    import sys
    import threading
    import time

    from chengeta_ai._core import PullLock

    make = PullLock if sys.argv[1] == "PullLock" else threading.RLock

    # the parent's main thread waits for a lock once (a contended `with`)
    lock = make()
    held, go = threading.Event(), threading.Event()

    def hold_briefly():
        with lock:
            held.set()
            go.wait(10)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait(10)
    threading.Timer(0.05, go.set).start()
    with lock:
        pass
    holder.join()

    def child():
        # this thread is the child's main thread: SIGINT runs its handler here
        lock = make()
        held = threading.Event()

        def hold():
            with lock:
                held.set()
                time.sleep(4)  # a stalled upstream read, the pull lock held

        threading.Thread(target=hold, daemon=True).start()
        held.wait(10)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            with lock:
                pass
            os._exit(3)
        except KeyboardInterrupt:
            # interrupted while waiting (0.2 s), or only once the holder let go (4 s)
            os._exit(0 if time.monotonic() - start < 2 else 4)

    pids = []

    def fork_from_a_thread():
        pid = os.fork()
        if pid == 0:
            child()
        pids.append(pid)

    forker = threading.Thread(target=fork_from_a_thread)
    forker.start()
    forker.join()
    _, status = os.waitpid(pids[0], 0)
    print(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("kind", ["RLock", "PullLock"])
def test_ctrl_c_interrupts_a_wait_in_a_child_forked_from_a_thread(kind: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SCRIPT, kind],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(chengeta_ai.__file__))},
    )
    assert proc.returncode == 0, proc.stderr
    # 4: the child's Ctrl-C waited for the holder (b7e190d, PullLock); 0: interrupted at once
    assert proc.stdout.strip() == "0"
