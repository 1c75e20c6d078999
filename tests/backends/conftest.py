"""Fixtures for the backend tests: a real redis-server, real SQLite files, every backend.

``backend`` runs a test on each backend (memory, sqlite, redis); ``twin`` runs it through the
sync methods and through their async twins (one test body, see `Twin`); ``anyio_backend`` puts
every async test on asyncio and trio (tests/conftest.py).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: redis_fixture

from chengeta_ai.backends.base import Backend, NamespacedBackend
from redis_fixture import RedisServer

BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests isolate themselves by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill (`kill`) and bring back (`start`)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def make_backend(kind: str, tmp_path: Path, redis_server: RedisServer | None, **kw: Any) -> Any:
    if kind == "memory":
        from chengeta_ai.backends.memory_backend import InMemoryBackend

        return InMemoryBackend(**kw)
    if kind == "sqlite":
        from chengeta_ai.backends.sqlite_backend import SQLiteBackend

        return SQLiteBackend(tmp_path / "cache" / "cache.sqlite3", **kw)
    if kind == "redis":
        from chengeta_ai.backends.redis_backend import RedisBackend

        assert redis_server is not None
        return RedisBackend(redis_server.url, prefix=f"t-{uuid.uuid4().hex[:8]}:", **kw)
    raise ValueError(kind)


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    server = request.getfixturevalue("redis_server") if backend_kind == "redis" else None
    b = make_backend(backend_kind, tmp_path, server)
    assert isinstance(b, Backend) and isinstance(b, NamespacedBackend)
    yield b
    b.close()


class Twin:
    """The backend's sync methods or their async twins, behind one async interface."""

    def __init__(self, backend: Any, mode: str) -> None:
        self.backend, self.mode = backend, mode

    async def _call(self, name: str, *args: Any) -> Any:
        if self.mode == "sync":
            return getattr(self.backend, name)(*args)
        return await getattr(self.backend, "a" + name)(*args)

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", key)  # type: ignore[no-any-return]

    async def set(
        self, key: str, value: bytes, ttl: float | None = None, tags: Sequence[str] = ()
    ) -> None:
        await self._call("set", key, value, ttl, tags)

    async def delete(self, key: str) -> bool:
        return await self._call("delete", key)  # type: ignore[no-any-return]

    async def exists(self, key: str) -> bool:
        return await self._call("exists", key)  # type: ignore[no-any-return]

    async def invalidate(self, tag: str) -> int:
        return await self._call("invalidate", tag)  # type: ignore[no-any-return]

    async def clear(self) -> None:
        await self._call("clear")

    async def invalidate_namespace(self, namespace: str, tag: str) -> int:
        return await self._call("invalidate_namespace", namespace, tag)  # type: ignore[no-any-return]

    async def clear_namespace(self, namespace: str) -> None:
        await self._call("clear_namespace", namespace)


@pytest.fixture
async def abackend(backend: Any, anyio_backend: str) -> AsyncIterator[Any]:
    """`backend` for async tests, closed with `aclose` on the test's own event loop: the asyncio
    Redis client of that loop can only be closed there (`close` merely drops it, and its
    connections would be reported unclosed once the loop is gone)."""
    yield backend
    await backend.aclose()


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, abackend: Any) -> Twin:
    return Twin(abackend, str(request.param))
