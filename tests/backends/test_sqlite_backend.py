"""SQLiteBackend on real files: persistence, processes, bounds, locked / read-only / corrupt."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from chengeta_ai.backends.sqlite_backend import SQLiteBackend, default_cache_path
from chengeta_ai.errors import BackendError


def test_persists_across_instances_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "cache.sqlite3"
    first = SQLiteBackend(str(path))
    first.set("k", b"v", ttl=60, tags=["t"])
    first.close()
    assert path.exists()
    second = SQLiteBackend(path)  # PathLike as well as str
    assert second.get("k") == b"v"
    assert second.invalidate("t") == 1
    assert second.stats()["entries"] == 0
    second.close()


def test_wal_mode(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db")
    b.set("k", b"v")
    with sqlite3.connect(tmp_path / "c.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    b.close()


def test_default_cache_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "chengeta_ai" / "cache.sqlite3"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "chengeta_ai" / "cache.sqlite3"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_path() == tmp_path / "home" / ".cache" / "chengeta_ai" / "cache.sqlite3"


def test_expired_rows_are_purged_lazily(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db", purge_interval=0.0)
    b.set("old", b"x" * 100, ttl=0.05, tags=["t"])
    time.sleep(0.1)
    assert b.get("old") is None  # invisible at once
    b.set("new", b"y")  # the next write purges
    stats = b.stats()
    assert stats["entries"] == 1 and stats["bytes"] == 1 and stats["expired_purged"] == 1
    b.close()


def test_max_entries_evicts_least_recently_used(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db", max_entries=10, touch_interval=0.0)
    for i in range(10):
        b.set(f"k{i}", b"v", tags=["t"])
        time.sleep(0.002)
    assert b.get("k0") == b"v"  # touched: now the most recent
    for i in range(10, 15):
        b.set(f"k{i}", b"v", tags=["t"])
        time.sleep(0.002)
    stats = b.stats()
    assert stats["entries"] == 10 and stats["evictions"] == 5
    assert b.get("k0") == b"v"
    assert [b.get(f"k{i}") for i in range(1, 6)] == [None] * 5
    assert b.invalidate("t") == 10  # evicted entries left no tag rows behind
    b.close()


def test_max_bytes(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db", max_bytes=10_000)
    for i in range(30):
        b.set(f"k{i}", os.urandom(1000))
    stats = b.stats()
    assert stats["bytes"] <= 10_000 and stats["entries"] == 10
    assert b.get("k29") is not None and b.get("k0") is None
    b.close()


def test_an_entry_larger_than_max_bytes_evicts_nothing_else(tmp_path: Path) -> None:
    """Review s4: it was written, then the bound evicted every other entry and itself."""
    b = SQLiteBackend(tmp_path / "c.db", max_bytes=1000)
    b.set("small", b"s" * 100, tags=["t"])
    b.set("big", b"old" * 10, tags=["t"])
    b.set("big", b"x" * 1001, tags=["t"])  # cannot fit on its own
    assert b.get("small") == b"s" * 100
    assert b.get("big") is None  # its older value is gone (it was being replaced)
    assert b.stats()["evictions"] == 1
    assert b.invalidate("t") == 1  # only "small" is left under the tag
    b.close()


def _writer(path: str, proc: int, n: int) -> None:
    b = SQLiteBackend(path, timeout=30.0)
    for i in range(n):
        b.set(f"p{proc}-{i}", b"%d" % i, ttl=600, tags=["all", f"proc:{proc}"])
        if i % 50 == 0:
            b.invalidate("nothing")
    b.close()


def test_two_processes_write_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    SQLiteBackend(path).set("seed", b"s")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 300)) for p in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    b = SQLiteBackend(path)
    assert b.stats()["entries"] == 601
    assert all(b.get(f"p{p}-{i}") == b"%d" % i for p in range(2) for i in range(300))
    assert b.invalidate("proc:0") == 300
    assert b.invalidate("all") == 300
    assert b.get("seed") == b"s"
    b.close()


def test_connection_is_reopened_after_fork(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db")
    b.set("parent", b"p")
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=lambda: b.set("child", b"c"))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert b.get("child") == b"c" and b.get("parent") == b"p"
    b.close()


def test_locked_file_raises_backend_error_after_timeout(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    b = SQLiteBackend(path, timeout=0.2)
    b.set("k", b"v")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET entries = entries WHERE id = 0")  # hold the write lock
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="locked"):
            b.set("k2", b"v2")
        assert time.monotonic() - t0 < 2.0
        assert b.get("k") == b"v"  # WAL: readers are not blocked by the writer
        assert b.stats()["errors"] == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    b.set("k2", b"v2")  # and works again once the lock is gone
    assert b.get("k2") == b"v2"
    b.close()


def test_corrupt_file_raises_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not a database" * 100)
    b = SQLiteBackend(path)  # opening is lazy: constructing never fails
    with pytest.raises(BackendError):
        b.get("k")
    with pytest.raises(BackendError):
        b.set("k", b"v")
    b.close()


def test_unusable_directory_raises_backend_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    b = SQLiteBackend(tmp_path / "file" / "cache.db")
    with pytest.raises(BackendError):
        b.set("k", b"v")


def test_closed_backend_raises_backend_error(tmp_path: Path) -> None:
    b = SQLiteBackend(tmp_path / "c.db")
    b.set("k", b"v")
    b.close()
    with pytest.raises(BackendError):
        b.get("k")


def _read_only_checks(path: str, as_uid: int | None, out: Any) -> None:
    try:
        if as_uid is not None:
            os.setgid(as_uid)
            os.setuid(as_uid)
        b = SQLiteBackend(path, timeout=0.2)
        results = []
        try:
            b.set("k2", b"v2")
            results.append("set: no error")
        except BackendError as exc:
            results.append(f"set: BackendError {exc}")
        try:
            results.append(f"get: {b.get('k')!r}")
        except BackendError as exc:
            results.append(f"get: BackendError {exc}")
        out.send(results)
    except BaseException as exc:
        out.send([f"crash: {exc!r}"])


def test_read_only_file_raises_backend_error() -> None:
    """A cache file (and directory) the process may not write: writes raise BackendError.

    Root ignores permission bits, so as root the checks run in a child that drops to
    ``nobody``.
    """
    tmp = Path(tempfile.mkdtemp(prefix="chengeta-ro-"))
    try:
        path = tmp / "c.db"
        b = SQLiteBackend(path)
        b.set("k", b"v")
        b.close()
        for p in tmp.iterdir():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        tmp.chmod(0o555)
        as_uid = 65534 if os.geteuid() == 0 else None
        recv, send = multiprocessing.Pipe(duplex=False)
        proc = multiprocessing.get_context("fork").Process(
            target=_read_only_checks, args=(str(path), as_uid, send)
        )
        proc.start()
        results = recv.recv()
        proc.join(30)
        assert results[0].startswith("set: BackendError"), results
        # reads may work or fail depending on the WAL files; either way, never a crash
        assert results[1] in ("get: b'v'",) or results[1].startswith("get: BackendError"), results
    finally:
        tmp.chmod(0o755)
        shutil.rmtree(tmp)
