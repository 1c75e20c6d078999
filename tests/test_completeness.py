"""The default completeness rule, directly (`sdk_stream_complete`): the cases review s4 found
stored truncated (a Chat Completions stream cut before its usage chunk; the SDK helpers' events
cut half way), and the cases that must stay complete."""

from __future__ import annotations

from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from chengeta_ai.layers.completeness import sdk_stream_complete
from chengeta_ai.testing import openai_chunks


def test_a_chat_stream_with_usage_is_complete_only_with_its_usage_chunk() -> None:
    chunks = openai_chunks(5, include_usage=True)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "usage" in chunks[0].model_fields_set  # explicit null in every chunk
    assert sdk_stream_complete(chunks)
    assert not sdk_stream_complete(chunks[:-1])  # cut after the finish_reason chunk


def test_a_chat_stream_without_usage_needs_no_usage_chunk() -> None:
    chunks = openai_chunks(5)
    assert "usage" not in chunks[0].model_fields_set
    assert sdk_stream_complete(chunks)
    assert not sdk_stream_complete(chunks[:-1])  # no finish_reason


def _helper_events(chunks: list[Any]) -> list[Any]:
    """The events `client.chat.completions.stream(...)` yields for ``chunks`` (the SDK's own
    state machine)."""
    state = ChatCompletionStreamState()
    return [event for chunk in chunks for event in state.handle_chunk(chunk)]


@pytest.mark.parametrize("usage", [False, True])
def test_chat_helper_events_are_complete_only_when_their_chunks_are(usage: bool) -> None:
    chunks = openai_chunks(5, include_usage=usage)
    events = _helper_events(chunks)
    assert type(events[-1]).__module__.startswith("openai.lib.streaming.chat")
    assert sdk_stream_complete(events)
    cut = _helper_events(chunks[:-1])
    assert not sdk_stream_complete(cut)
    # cut in the middle of the content: the last event is a content delta
    middle = _helper_events(chunks[:3])
    assert getattr(middle[-1], "type", None) == "content.delta"
    assert not sdk_stream_complete(middle)


def test_a_cached_client_head_that_expects_usage_requires_the_usage_chunk() -> None:
    """Legacy Completions chunks do not announce usage: the cached client's head records that
    the request asked for it (review s4: a stream cut before its usage chunk was stored)."""
    from openai.types import Completion

    from chengeta_ai.clients.recorded import HttpHead

    def chunk(finish: str | None, usage: dict[str, int] | None = None) -> Completion:
        choices = [] if usage else [{"index": 0, "text": "x", "finish_reason": finish}]
        body: dict[str, Any] = {"id": "c", "object": "text_completion", "created": 1}
        body.update(model="m", choices=choices)
        if usage:
            body["usage"] = usage
        return Completion.construct(**body)

    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    body = [chunk(None), chunk("stop")]
    expects = HttpHead.model_construct(expects_usage=True, endpoint="openai.completions")
    plain = HttpHead.model_construct(endpoint="openai.completions")
    assert sdk_stream_complete([plain, *body])
    assert not sdk_stream_complete([expects, *body])
    assert sdk_stream_complete([expects, *body, chunk(None, usage)])
