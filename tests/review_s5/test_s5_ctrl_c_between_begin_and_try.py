"""Finding (medium): Ctrl-C right after `CacheManager._begin_removal` returned, before the
``try`` of `CacheManager._removal` (``racing = self._begin_removal(matches)`` then ``try:``),
leaves the removal counted as a writer of every key whose write it raced, for good.

CPython delivers a pending SIGINT at the eval breaker at the end of a call (see review s4's
``test_ctrl_c_after_pull_lock``): the ``KeyboardInterrupt`` is raised after `begin_removal`
added the removal to the key's writers, and ``finally: self._end_removal(racing)`` is not
reached. The key's `_KeyStores` record leaks, and every later write of the key looks overlapped
forever (writers never reach 0): a later removal racing a write of that key no longer undoes it,
so the stream begun before that removal is stored after it returned and served as a hit.
Reproduced with a profile hook raising ``KeyboardInterrupt`` on the return of `_begin_removal`.
Fix direction: begin inside the ``try`` (``racing = []`` first), and end every key even when one
rewrite raises.
"""

from __future__ import annotations

import sys
import threading
import time
from types import FrameType
from typing import Any

import pytest

from chengeta_ai import CacheManager
from chengeta_ai.backends.memory_backend import InMemoryBackend
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o"


class _HeldSets(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()
        self.hold = False

    def set(self, key: str, value: bytes, ttl: float | None = None, tags: Any = ()) -> None:
        if self.hold:
            self.hold = False
            self.writing.set()
            assert self.release.wait(10)
        super().set(key, value, ttl, tags)


def _ctrl_c_after_begin(frame: FrameType, event: str, arg: Any) -> None:
    if event == "return" and frame.f_code.co_name == "_begin_removal":
        sys.setprofile(None)
        raise KeyboardInterrupt


def _write_under_way(cache: StreamingResponseCache, backend: _HeldSets, text: str) -> Any:
    backend.hold = True
    backend.writing.clear()
    backend.release.clear()
    t = threading.Thread(
        target=lambda: list(cache.get_or_stream(["q"], lambda _m: iter([text]), model_id=MODEL))
    )
    t.start()
    assert backend.writing.wait(10)
    return t


def test_ctrl_c_after_begin_removal_leaves_no_writer_behind() -> None:
    backend = _HeldSets()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)
    writer = _write_under_way(cache, backend, "old")
    sys.setprofile(_ctrl_c_after_begin)
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.manager.delete(key)
    finally:
        sys.setprofile(None)
    backend.release.set()
    writer.join(10)
    assert cache.flights._stores == {}


def test_after_ctrl_c_in_a_removal_a_later_removal_still_undoes_a_racing_write() -> None:
    backend = _HeldSets()
    cache = StreamingResponseCache(CacheManager(backend=backend))
    key = cache.manager.key_builder.build(["q"], MODEL)
    writer = _write_under_way(cache, backend, "first")
    sys.setprofile(_ctrl_c_after_begin)
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.manager.delete(key)
    finally:
        sys.setprofile(None)
    backend.release.set()
    writer.join(10)
    cache.manager.delete(key)
    # later: an old answer is being written when the key is deleted; the delete returns
    writer = _write_under_way(cache, backend, "old")
    # (fixed design: the delete waits for the write it raced, so it runs in a thread)
    deleter = threading.Thread(target=cache.manager.delete, args=(key,))
    deleter.start()
    while not cache.flights._stores[key].removed:
        time.sleep(0.001)
    backend.release.set()
    writer.join(10)
    deleter.join(10)
    hit = cache.get_or_stream(["q"], lambda _m: iter(["new"]), model_id=MODEL)
    assert list(hit) == ["new"], hit.cache_info
