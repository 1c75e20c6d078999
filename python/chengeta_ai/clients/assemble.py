"""One entry, both modes: a whole (``stream=False``) call served from its cached streamed twin.

When a whole call misses, the cached client looks up, as a second and explicit step, the entry
of the same request made with ``stream=True`` (for Chat Completions: with
``stream_options={"include_usage": True}``, the only streamed form that carries the usage a
whole reply has). If it is there, its events are assembled, with the SDK's own accumulators,
into the JSON body the API returns for that content; the SDK client parses that body as it
parses a whole reply, and the object is the answer (stored under the whole call's key too):
the API's own reply field for field, ``model_fields_set`` and extras included.

- Chat Completions: ``openai.lib.streaming.chat.ChatCompletionStreamState`` (content, refusal,
  tool calls, logprobs, finish reasons, usage), as a plain ``ChatCompletion`` (the API's
  ``annotations: []`` for a message without annotations);
- Responses: the ``Response`` carried by the terminal ``response.completed`` (or
  ``response.incomplete``) event, which is the whole response;
- Anthropic Messages: the SDK's ``MessageStream`` accumulator, as a plain ``Message`` with the
  fields the stream sent (the accumulator sets ``stop_details`` whether it was sent or not).

Legacy Completions have no SDK accumulator and are not assembled. The reverse (streaming a
cached whole object) is never done: it would invent chunk boundaries. ``stats()`` counts
``cross_mode_hits``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["assemble", "twin_request"]

_TERMINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete"})


def twin_request(endpoint: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """The hashed request of the streamed call whose entry can answer this whole one."""
    if endpoint == "openai.chat.completions":
        if "stream_options" in request:
            return None
        return {**request, "stream_options": {"include_usage": True}}
    if endpoint in ("openai.responses", "anthropic.messages"):
        return request
    return None


def assemble(endpoint: str, events: list[Any]) -> tuple[type, dict[str, Any]] | None:
    """``(the whole object's class, the JSON body the API returns for it)`` made from the
    streamed ``events``, or None if they cannot make one. The caller builds the object from
    the body as the SDK client builds a whole reply (its ``_process_response_data``), so that
    it is that reply field for field, ``model_fields_set`` and extras included."""
    if not events:
        return None
    if endpoint == "openai.chat.completions":
        return _chat(events)
    if endpoint == "openai.responses":
        last = events[-1]
        if getattr(last, "type", None) in _TERMINAL_RESPONSE_EVENTS:
            return type(last.response), _body(last.response)
        return None
    if endpoint == "anthropic.messages":
        return _message(events)
    return None


def _body(model: Any, **exclude: Any) -> dict[str, Any]:
    """The JSON body a parsed model was made from: the fields it was given (by their JSON
    names), extras included."""
    return model.model_dump(  # type: ignore[no-any-return]
        mode="json", by_alias=True, exclude_unset=True, warnings=False, **exclude
    )


def _chat(chunks: list[Any]) -> tuple[type, dict[str, Any]] | None:
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletion

    if chunks[-1].usage is None:  # the include_usage twin ends with its usage chunk
        return None
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    data = _body(state.get_final_completion())
    for choice in data.get("choices", ()):
        message = choice.get("message", {})
        message.pop("parsed", None)
        for name in ("audio", "function_call", "tool_calls"):
            if message.get(name) is None:
                message.pop(name, None)
        if message.get("annotations") is None:
            message["annotations"] = []
    return ChatCompletion, data


class _Events:
    """The raw stream the SDK's `MessageStream` reads: the stored events."""

    response = None

    def __init__(self, events: list[Any]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[Any]:
        return iter(self._events)

    def close(self) -> None:
        pass


def _message(events: list[Any]) -> tuple[type, dict[str, Any]] | None:
    from anthropic import NOT_GIVEN  # type: ignore[import-not-found, unused-ignore]
    from anthropic.lib.streaming import (  # type: ignore[import-not-found, unused-ignore]
        MessageStream,
    )
    from anthropic.types import Message  # type: ignore[import-not-found, unused-ignore]

    if getattr(events[-1], "type", None) != "message_stop":
        return None
    stream = MessageStream(_Events(events), output_format=NOT_GIVEN)  # type: ignore[arg-type]
    final = stream.get_final_message()
    data = _body(final, exclude={"content": {"__all__": {"parsed_output"}}})
    # The accumulator assigns the message_delta's fields (stop_details, container, ...) whether
    # the API sent them or not: the whole reply has a field only if the stream sent it, in
    # message_start's message or in a message_delta's delta.
    sent: set[str] = {"content"}
    for event in events:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            sent |= event.message.model_fields_set | set(event.message.model_extra or ())
        elif kind == "message_delta":
            sent |= event.delta.model_fields_set | set(event.delta.model_extra or ())
    return Message, {name: value for name, value in data.items() if name in sent}
