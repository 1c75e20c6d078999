"""Smoke test of ``python -m chengeta_ai demo --fast`` (a subprocess, as a user runs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: redis_fixture

from chengeta_ai.demo.server import LocalOpenAIServer
from redis_fixture import RedisServer

# A row of the demo's table: label, first chunk, total, upstream calls, chunks, served from.
MISS_ROW = r"^  MISS +[\d,.]+ ms +[\d,.]+ ms +1 +62 +upstream$"
HIT_ROW = r"^  HIT +[\d,.]+ ms +[\d,.]+ ms +0 +62 +(stored entry|in-flight stream)$"
# The header's backend line for the default backend; group 1 is the file's path.
SQLITE_LINE = r"^  backend:  SQLiteBackend \(a file kept across runs\) at (.+)$"


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every demo subprocess gets its own XDG_CACHE_HOME: the default SQLite backend never
    writes into the real home directory."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def _run_demo(
    *extra: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)  # XDG_CACHE_HOME: a tmp dir (the autouse fixture above)
    env.pop("OPENAI_API_KEY", None)  # never reach the real API from the test suite
    env.pop("OPENAI_BASE_URL", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "chengeta_ai", "demo", "--fast", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("async_backend", ["asyncio", "trio"])
def test_demo_fast(async_backend: str) -> None:
    proc = _run_demo("--async-backend", async_backend)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "local OpenAI-compatible server at http://127.0.0.1:" in out
    assert "[sync] openai.OpenAI + get_or_stream" in out
    assert f"[async] openai.AsyncOpenAI + aget_or_stream on {async_backend}" in out
    # Two tables, each: a header, a MISS row with one upstream call, a HIT row with none.
    assert len(re.findall(r"first chunk +total +upstream calls +chunks +served from", out)) == 2
    assert len(re.findall(MISS_ROW, out, re.M)) == 2
    assert len(re.findall(HIT_ROW, out, re.M)) == 2
    assert len(re.findall(r"stored: [\d,]+ bytes for 62 chunks \([\d,.]+ bytes/chunk\)", out)) == 2
    assert out.rstrip().endswith("replayed it from the cache.")
    assert "UNEXPECTED" not in out
    assert proc.stderr == ""


def _assert_demo_ok(proc: subprocess.CompletedProcess[str], runs: int, chunks: int = 62) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    miss_row, hit_row = (r.replace("62", str(chunks)) for r in (MISS_ROW, HIT_ROW))
    assert len(re.findall(miss_row, out, re.M)) == runs
    assert len(re.findall(hit_row, out, re.M)) == runs
    assert "UNEXPECTED" not in out


def _sqlite_path(out: str) -> Path:
    match = re.search(SQLITE_LINE, out, re.M)
    assert match, out
    return Path(match.group(1))


def test_demo_default_backend_is_sqlite_under_the_cache_dir(cache_home: Path) -> None:
    proc = _run_demo("--sync-only")
    _assert_demo_ok(proc, runs=1)
    path = _sqlite_path(proc.stdout)
    assert path == cache_home / "chengeta_ai" / "cache.sqlite3"
    assert path.is_file()


def test_demo_sqlite_backend() -> None:
    proc = _run_demo("--backend", "sqlite", "--async-backend", "trio")
    _assert_demo_ok(proc, runs=2)
    assert _sqlite_path(proc.stdout).is_file()


def test_demo_twice_on_the_same_file(tmp_path: Path) -> None:
    """The file persists: the second run still shows a miss then a hit in both of its runs,
    because each run drops the demo's own entries first, and only those."""
    from chengeta_ai.backends.sqlite_backend import SQLiteBackend

    path = tmp_path / "sub" / "demo.sqlite3"
    other = SQLiteBackend(path)
    other.set("someone-else", b"kept", tags=["model:gpt-4o-mini"])
    other.close()

    dropped = []
    for _ in range(2):
        proc = _run_demo("--sqlite-path", str(path))
        _assert_demo_ok(proc, runs=2)
        assert _sqlite_path(proc.stdout) == path
        assert path.is_file()
        dropped.append(
            [
                int(n)
                for n in re.findall(
                    r"^  manager\.invalidate\('chengeta-demo'\) dropped (\d+) entr",
                    proc.stdout,
                    re.M,
                )
            ]
        )
    # sync finds the file empty of demo entries, async finds the sync run's; the second process
    # finds the first one's.
    assert dropped == [[0, 1], [1, 1]]

    backend = SQLiteBackend(path)
    try:
        assert backend.get("someone-else") == b"kept"  # not the demo's: left alone
        assert backend.stats()["entries"] == 2  # that one and the demo's last entry
    finally:
        backend.close()


def test_demo_sqlite_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _run_demo("--sqlite-path", str(blocker / "cache.sqlite3"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot open the SQLite cache at" in proc.stderr


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (scripts/ensure_redis.sh)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("async_backend", ["asyncio", "trio"])
def test_demo_redis_backend(redis_server: RedisServer, async_backend: str) -> None:
    import redis

    proc = _run_demo(
        "--backend", "redis", "--redis-url", redis_server.url, "--async-backend", async_backend
    )
    _assert_demo_ok(proc, runs=2)
    assert (
        f"backend:  RedisBackend (a fresh key prefix, cleared at exit) at {redis_server.url}"
        in (proc.stdout)
    )
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.dbsize() == 0  # the demo cleaned up after itself


def test_demo_memory_backend(cache_home: Path) -> None:
    proc = _run_demo("--backend", "memory")
    _assert_demo_ok(proc, runs=2)
    assert "backend:  InMemoryBackend (process memory)\n" in proc.stdout
    assert not cache_home.exists()  # no file written


def test_demo_redis_unreachable_is_a_clear_error() -> None:
    from redis_fixture import free_port

    proc = _run_demo("--backend", "redis", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert proc.returncode == 2
    assert "cannot reach Redis" in proc.stderr


def test_demo_real_mode_uses_the_environment(server: LocalOpenAIServer) -> None:
    """``--real`` builds the clients from OPENAI_API_KEY / OPENAI_BASE_URL, as the SDK does;
    pointed at the local server here, so the test never leaves the machine."""
    before = server.request_count
    proc = _run_demo(
        "--real",
        "--model",
        "gpt-4o",
        env_extra={"OPENAI_API_KEY": "x", "OPENAI_BASE_URL": server.base_url},
    )
    _assert_demo_ok(proc, runs=2, chunks=server.tokens + 2)
    assert f"upstream: the OpenAI API at {server.base_url} (OPENAI_API_KEY)" in proc.stdout
    assert server.request_count - before == 2  # one miss per run
    assert server.last_request is not None
    assert server.last_request["model"] == "gpt-4o"


def test_demo_real_without_key_is_a_usage_error() -> None:
    proc = _run_demo("--real")
    assert proc.returncode == 2
    assert "OPENAI_API_KEY" in proc.stderr


def test_demo_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chengeta_ai", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert "--backend" in proc.stdout
    assert "--sqlite-path" in proc.stdout
    assert "--async-backend" in proc.stdout
