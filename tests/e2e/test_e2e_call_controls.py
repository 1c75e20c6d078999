"""Per-call controls and ``cache_info`` with the real ``openai`` clients over HTTP to the local
server: statuses, ``no_cache`` / ``no_store`` / ``only_if_cached``, and a recorded-pace replay
whose chunks equal the live ones."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from chengeta_ai import CacheControl, CacheManager, CacheMiss, InMemoryBackend
from chengeta_ai._core import decode_timing
from chengeta_ai.core.cache_manager import unframe_entry
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

MODEL = "gpt-4o-mini"


def test_sync_client_statuses_controls_and_recorded_replay(
    server: LocalOpenAIServer, prompt: list[dict[str, str]]
) -> None:
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0) as client:

        def stream_fn(messages: Any) -> Any:
            return client.chat.completions.create(model=MODEL, messages=messages, stream=True)

        before = server.request_count
        with pytest.raises(CacheMiss):
            list(cache.get_or_stream(prompt, stream_fn, cache_control={"only_if_cached": True}))
        assert server.request_count == before

        stream = cache.get_or_stream(prompt, stream_fn, cache_control={"no_store": True})
        live = list(stream)
        assert stream.cache_info is not None
        assert (stream.cache_info.status, stream.cache_info.outcome) == ("miss", "no_store")

        stream = cache.get_or_stream(prompt, stream_fn)
        live = list(stream)
        assert stream.cache_info is not None and stream.cache_info.outcome == "stored"
        raw = cache.manager.backend.get(stream.cache_info.key)
        assert raw is not None
        timing = unframe_entry(raw).timing
        assert timing is not None
        offsets = decode_timing(bytes(timing), max_total_seconds=60)
        assert len(offsets) == len(live) and offsets[0] >= 0.009  # the server's first token delay

        stream = cache.get_or_stream(
            prompt, stream_fn, cache_control=CacheControl(replay="recorded", only_if_cached=True)
        )
        replayed = list(stream)
        assert replayed == live and [type(c) for c in replayed] == [type(c) for c in live]
        assert stream.cache_info is not None and stream.cache_info.status == "hit"
        assert stream.cache_info.age is not None

        stream = cache.get_or_stream(prompt, stream_fn, cache_control={"no_cache": True})
        assert len(list(stream)) == len(live)
        assert stream.cache_info is not None and stream.cache_info.status == "refresh"
        assert server.request_count == before + 3
