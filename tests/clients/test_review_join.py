"""Adversarial review: callers that join one whole (non-streamed) call. `remember` gives a
joiner a *shallow* ``model_copy`` so each caller has its own object for `cache_info_of`, but the
nested models (``choices``, ``message``) stay shared: one caller's edit of its reply is seen in
another caller's reply. The README's "treat chunks as read-only" speaks of stream chunks; a
whole call's object is the SDK's model object, which the SDK never shares. Fails today."""

from __future__ import annotations

import threading
from typing import Any

import openai

from chengeta_ai import CacheManager, cache_info_of, cached
from chengeta_ai.demo.server import LocalOpenAIServer
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def test_joined_whole_call_objects_share_nested_models() -> None:
    with LocalOpenAIServer(first_token_delay=0.5, token_interval=0.01, tokens=12) as server:
        cache = StreamingResponseCache(CacheManager())
        with openai.OpenAI(base_url=server.base_url, api_key="sk", max_retries=0) as raw:
            client = cached(raw, cache)
            request = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "review joined whole call"}],
            }
            results: dict[int, Any] = {}
            barrier = threading.Barrier(2)

            def call(i: int) -> None:
                barrier.wait()
                results[i] = client.chat.completions.create(**request)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            statuses = sorted(cache_info_of(results[i]).status for i in range(2))  # type: ignore[union-attr]
            assert statuses == ["join", "miss"]  # one upstream call, two callers
            results[0].choices[0].message.content = "edited by caller 0"
            assert results[1].choices[0].message.content != "edited by caller 0"
