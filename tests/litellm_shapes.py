"""Classes shaped like LiteLLM's streaming chunk (``litellm.types.utils``, 1.110), for the
model-discovery tests without installing LiteLLM (heavy: it fetches a price map at import).

What matters is reproduced faithfully: ``ModelResponseStream`` annotates ``choices`` as a list
of ``StreamingChoices`` but keeps ``usage`` (a ``Usage``) in its extras; ``StreamingChoices``
declares no fields at all and sets ``delta`` (a ``Delta``), ``index``, ``finish_reason`` and
``logprobs`` as extras in ``__init__``; ``Delta`` keeps ``content``/``role``/``tool_calls`` in
extras; ``Usage`` annotates its nested details. So ``Delta`` and ``Usage`` are reached only
through run-time values, never through annotations.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Object(BaseModel):
    model_config = ConfigDict(extra="allow")


def _set_extra(model: BaseModel, name: str, value: Any) -> None:
    extra = model.__pydantic_extra__
    assert extra is not None
    extra[name] = value


class PromptTokensDetailsWrapper(_Object):
    cached_tokens: int | None = None
    text_tokens: int | None = None


class Usage(_Object):
    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetailsWrapper | None = None


class Function(_Object):
    arguments: str = ""
    name: str | None = None


class ChatCompletionDeltaToolCall(_Object):
    id: str | None = None
    function: Function
    type: str | None = None
    index: int


class Delta(_Object):
    reasoning_content: str | None = None
    provider_specific_fields: dict[str, Any] | None = None

    def __init__(
        self,
        content: str | None = None,
        role: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        _set_extra(self, "content", content)
        _set_extra(self, "role", role)
        _set_extra(
            self,
            "tool_calls",
            None
            if tool_calls is None
            else [ChatCompletionDeltaToolCall(**call) for call in tool_calls],
        )


class StreamingChoices(_Object):
    def __init__(
        self,
        finish_reason: str | None = None,
        index: int = 0,
        delta: Delta | dict[str, Any] | None = None,
        logprobs: Any = None,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        _set_extra(self, "finish_reason", finish_reason)
        _set_extra(self, "index", index)
        if isinstance(delta, dict):
            delta = Delta(**delta)
        _set_extra(self, "delta", delta if delta is not None else Delta())
        _set_extra(self, "logprobs", logprobs)


class ModelResponseStream(_Object):
    id: str
    created: int
    model: str | None = None
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    choices: list[StreamingChoices]
    provider_specific_fields: dict[str, Any] | None = None

    def __init__(self, choices: list[Any] | None = None, **kwargs: Any) -> None:
        usage = kwargs.pop("usage", None)
        new_choices = [
            c if isinstance(c, StreamingChoices) else StreamingChoices(**c) for c in choices or []
        ]
        super().__init__(choices=new_choices, **kwargs)
        if isinstance(usage, dict):
            _set_extra(self, "usage", Usage(**usage))


def stream(text: str = "Hello there, cached world") -> list[ModelResponseStream]:
    """A LiteLLM-style stream: role, content tokens, a tool call delta, finish, usage."""
    chunks = [
        ModelResponseStream(
            id="chatcmpl-1",
            created=1,
            model="gpt-4o",
            choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        )
    ]
    for word in text.split(" "):
        chunks.append(
            ModelResponseStream(
                id="chatcmpl-1",
                created=1,
                model="gpt-4o",
                choices=[{"index": 0, "delta": {"content": word + " "}}],
            )
        )
    chunks.append(
        ModelResponseStream(
            id="chatcmpl-1",
            created=1,
            model="gpt-4o",
            choices=[
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "index": 0,
                                "type": "function",
                                "function": {"name": "lookup", "arguments": "{}"},
                            },
                        ]
                    },
                }
            ],
        )
    )
    chunks.append(
        ModelResponseStream(
            id="chatcmpl-1",
            created=1,
            model="gpt-4o",
            choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
            usage={
                "prompt_tokens": 5,
                "completion_tokens": 7,
                "total_tokens": 12,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        )
    )
    return chunks
