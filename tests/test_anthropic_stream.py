"""Anthropic's streamed message events go through the compact codec and the cache unchanged.

The events are built the way the ``anthropic`` SDK builds them from server-sent events
(``construct_type`` over the wire JSON, no validation).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

anthropic = pytest.importorskip("anthropic")

from anthropic._models import construct_type  # noqa: E402
from anthropic.types import RawMessageStreamEvent  # noqa: E402

from chengeta_ai import CacheManager, CompactSerializer  # noqa: E402
from chengeta_ai.layers.streaming_cache import StreamingResponseCache  # noqa: E402
from chengeta_ai.testing import TEXT, tokenize  # noqa: E402


def wire_events(n_tokens: int) -> list[dict[str, Any]]:
    msg = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1},
    }
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": msg},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    tokens = tokenize(TEXT)
    for i in range(n_tokens):
        events.append(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": tokens[i % len(tokens)]},
            }
        )
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": n_tokens},
        },
        {"type": "message_stop"},
    ]
    return events


def sdk_events(n_tokens: int) -> list[Any]:
    return [construct_type(type_=RawMessageStreamEvent, value=e) for e in wire_events(n_tokens)]


def test_events_round_trip_field_for_field() -> None:
    events = sdk_events(300)
    serializer = CompactSerializer()
    encoder = serializer.stream_encoder()
    for event in events:
        encoder.push(event)
    data = encoder.finish()
    replayed = [e for batch in serializer.iter_batches(data) for e in batch]
    assert replayed == events
    for a, b in zip(replayed, events, strict=True):
        assert type(a) is type(b)
        assert a.model_dump(exclude_unset=True) == b.model_dump(exclude_unset=True)
    assert len(data) / len(events) < 12, f"{len(data) / len(events):.1f} bytes per event"


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_anthropic_stream_through_the_cache(mode: str) -> None:
    events = sdk_events(50)
    calls = 0

    def stream_fn(messages: Any) -> Any:
        nonlocal calls
        calls += 1
        return iter(events)

    async def astream_fn(messages: Any) -> Any:
        nonlocal calls
        calls += 1
        for event in events:
            yield event

    cache = StreamingResponseCache(CacheManager())
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        if mode == "sync":
            got = list(cache.get_or_stream(messages, stream_fn, model_id="claude"))
        else:

            async def run() -> list[Any]:
                return [
                    e async for e in cache.aget_or_stream(messages, astream_fn, model_id="claude")
                ]

            got = anyio.run(run, backend=mode)
        assert got == events
        text = "".join(e.delta.text for e in got if e.type == "content_block_delta")
        assert text.startswith("Caching stores")
    assert calls == 1
    assert cache.stats()["hits"] == 1
