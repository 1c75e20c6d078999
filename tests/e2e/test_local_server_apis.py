"""Every API the local upstream serves, through the real SDK clients over HTTP.

OpenAI Chat Completions, legacy Completions and Responses with the ``openai`` client, Anthropic
Messages with the ``anthropic`` client; streamed and not, sync and async (asyncio and trio), the
raw SSE wire checked against the SDKs' own types, and every failure mode of every streaming
endpoint. Upstream calls are counted per endpoint (`LocalOpenAIServer.request_counts`).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from chengeta_ai.demo.server import LocalOpenAIServer, RequestCounts

pytestmark = [
    pytest.mark.filterwarnings("error"),  # the marks listed later take precedence
    # The openai SDK's AsyncStream stops reading at `data: [DONE]` and leaves its SSE decoder
    # and the HTTP library's body generators under it to the garbage collector, which trio
    # reports (asyncio closes them quietly): a client-side leak, not the server's. Every other
    # warning is an error here.
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(openai|httpx2?|httpcore2?)\.:ResourceWarning"
    ),
]

MODEL = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-6"
FAIL_AFTER = 5

RESPONSE_EVENTS = TypeAdapter[Any](ResponseStreamEvent)
ANTHROPIC_EVENTS = TypeAdapter[Any](RawMessageStreamEvent)


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def client(server: LocalOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0) as c:
        yield c


@pytest.fixture
def claude(server: LocalOpenAIServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=server.anthropic_base_url, api_key="local", max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def aclient(server: LocalOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="local", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclaude(server: LocalOpenAIServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key="local", max_retries=0
    ) as c:
        yield c


@pytest.fixture
def text(request: pytest.FixtureRequest) -> str:
    """A prompt unique to the test (and its parameters)."""
    return f"Explain caching in 3 sentences ({request.node.nodeid})"


def _fail(mode: str, after: int = FAIL_AFTER) -> dict[str, str]:
    return {"x-chengeta-fail-after": str(after), "x-chengeta-fail-mode": mode}


def _raw(
    server: LocalOpenAIServer,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST with the standard library: status, headers, the whole body."""
    req = urllib.request.Request(
        server.anthropic_base_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def _sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per Server-Sent Event."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            else:
                assert field == "data", line
                data.append(value)
        out.append((name, "\n".join(data)))
    return out


def _counts(server: LocalOpenAIServer, before: RequestCounts) -> dict[str, int]:
    """The requests served since ``before``, per endpoint (zeros left out)."""
    after = server.request_counts
    return {
        k: v - getattr(before, k) for k, v in after._asdict().items() if v != getattr(before, k)
    }


def _is_transport_error(exc: BaseException) -> bool:
    """The connection dropped mid-body: the openai SDK wraps it in APIConnectionError, the
    anthropic SDK lets the HTTP library's RemoteProtocolError through while streaming."""
    return isinstance(exc, (openai.APIConnectionError, anthropic.APIConnectionError)) or (
        type(exc).__name__ == "RemoteProtocolError"
    )


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


RESPONSES_SEQUENCE_HEAD = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
RESPONSES_SEQUENCE_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
MESSAGES_SEQUENCE_HEAD = ["message_start", "content_block_start", "ping"]
MESSAGES_SEQUENCE_TAIL = ["content_block_stop", "message_delta", "message_stop"]


# -- OpenAI Responses ----------------------------------------------------------------------------


def test_responses_wire_format_parses_with_the_sdk_types(
    server: LocalOpenAIServer, text: str
) -> None:
    before = server.request_counts
    status, headers, raw = _raw(
        server, "/v1/responses", {"model": "gpt-4o", "input": text, "stream": True}
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-request-id"].startswith("req_")
    events = _sse(raw)
    names = [name for name, _ in events]
    n = server.tokens
    assert names == (
        RESPONSES_SEQUENCE_HEAD + ["response.output_text.delta"] * n + RESPONSES_SEQUENCE_TAIL
    )
    parsed = [RESPONSE_EVENTS.validate_json(data) for _, data in events]
    assert [e.type for e in parsed] == names  # the event line names the payload's type
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    deltas = [json.loads(data) for name, data in events if name == "response.output_text.delta"]
    assert all(isinstance(d["obfuscation"], str) and d["obfuscation"] for d in deltas)
    created, completed = parsed[0].response, parsed[-1].response
    assert created.status == "in_progress" and created.output == []
    assert completed.status == "completed" and completed.model == "gpt-4o"
    assert completed.id == created.id
    assert completed.output_text == "".join(d["delta"] for d in deltas)
    assert completed.usage is not None and completed.usage.output_tokens == n
    assert _counts(server, before) == {"responses": 1}


def test_responses_non_streamed_is_the_completed_response(
    server: LocalOpenAIServer, client: openai.OpenAI, text: str
) -> None:
    status, _, raw = _raw(server, "/v1/responses", {"model": MODEL, "input": text})
    assert status == 200
    direct = Response.model_validate_json(raw)
    streamed = [e for e in client.responses.create(model=MODEL, input=text, stream=True)]
    assert streamed[-1].type == "response.completed"
    assert direct.model_dump() == streamed[-1].response.model_dump()
    via_sdk = client.responses.create(model=MODEL, input=text)
    assert via_sdk.output_text == direct.output_text
    assert via_sdk.status == "completed"


def test_responses_create_stream(
    server: LocalOpenAIServer, client: openai.OpenAI, text: str
) -> None:
    before = server.request_counts
    events = list(client.responses.create(model=MODEL, input=text, stream=True))
    assert [e.type for e in events][:4] == RESPONSES_SEQUENCE_HEAD
    assert [e.type for e in events][-4:] == RESPONSES_SEQUENCE_TAIL
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == server.tokens
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == "".join(deltas)
    assert final.response.model == MODEL
    assert _counts(server, before) == {"responses": 1}


def test_responses_stream_helper_final_response(
    server: LocalOpenAIServer, client: openai.OpenAI, text: str
) -> None:
    with client.responses.stream(model=MODEL, input=text) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "".join(deltas)
    assert final.output_text == client.responses.create(model=MODEL, input=text).output_text


def test_responses_without_obfuscation(
    server: LocalOpenAIServer, client: openai.OpenAI, text: str
) -> None:
    _, _, raw = _raw(
        server,
        "/v1/responses",
        {
            "model": MODEL,
            "input": text,
            "stream": True,
            "stream_options": {"include_obfuscation": False},
        },
    )
    assert all("obfuscation" not in json.loads(data) for _, data in _sse(raw))


def test_responses_deterministic_per_prompt(client: openai.OpenAI, text: str) -> None:
    def run(prompt: str) -> list[dict[str, Any]]:
        return [
            e.model_dump() for e in client.responses.create(model=MODEL, input=prompt, stream=True)
        ]

    assert run(text) == run(text)
    assert run(text) != run(text + "!")


@pytest.mark.anyio
async def test_responses_async(
    server: LocalOpenAIServer, aclient: openai.AsyncOpenAI, text: str
) -> None:
    before = server.request_counts
    events = [e async for e in await aclient.responses.create(model=MODEL, input=text, stream=True)]
    assert events[-1].type == "response.completed"
    async with aclient.responses.stream(model=MODEL, input=text) as stream:
        final = await stream.get_final_response()
    assert final.output_text == events[-1].response.output_text
    whole = await aclient.responses.create(model=MODEL, input=text)
    assert whole.output_text == final.output_text
    assert _counts(server, before) == {"responses": 3}


# -- Anthropic Messages --------------------------------------------------------------------------


def test_messages_wire_format_parses_with_the_sdk_types(
    server: LocalOpenAIServer, text: str
) -> None:
    before = server.request_counts
    body = {"model": CLAUDE, "max_tokens": 1024, "messages": _user(text), "stream": True}
    status, headers, raw = _raw(server, "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["request-id"].startswith("req_")
    events = _sse(raw)
    names = [name for name, _ in events]
    n = server.tokens
    assert names == MESSAGES_SEQUENCE_HEAD + ["content_block_delta"] * n + MESSAGES_SEQUENCE_TAIL
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == names
    parsed = [ANTHROPIC_EVENTS.validate_python(p) for p in payloads if p["type"] != "ping"]
    start, delta = parsed[0], parsed[-2]
    assert start.type == "message_start" and start.message.model == CLAUDE
    assert start.message.content == [] and start.message.stop_reason is None
    assert delta.type == "message_delta" and delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == n
    assert all(p.delta.type == "text_delta" for p in parsed if p.type == "content_block_delta")
    assert _counts(server, before) == {"messages": 1}


def test_messages_non_streamed(
    server: LocalOpenAIServer, claude: anthropic.Anthropic, text: str
) -> None:
    body = {"model": CLAUDE, "max_tokens": 1024, "messages": _user(text)}
    status, _, raw = _raw(server, "/v1/messages", body)
    assert status == 200
    direct = Message.model_validate_json(raw)
    assert direct.stop_reason == "end_turn" and direct.model == CLAUDE
    message = claude.messages.create(model=CLAUDE, max_tokens=1024, messages=_user(text))
    assert message.model_dump() == direct.model_dump()


def test_messages_create_stream_and_stream_helper(
    server: LocalOpenAIServer, claude: anthropic.Anthropic, text: str
) -> None:
    before = server.request_counts
    events = list(
        claude.messages.create(model=CLAUDE, max_tokens=1024, messages=_user(text), stream=True)
    )
    # the SDK drops `ping`
    names = ["message_start", "content_block_start"]
    names += ["content_block_delta"] * server.tokens + MESSAGES_SEQUENCE_TAIL
    assert [e.type for e in events] == names
    streamed = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    with claude.messages.stream(model=CLAUDE, max_tokens=1024, messages=_user(text)) as stream:
        live = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert live == streamed
    assert final.content[0].type == "text" and final.content[0].text == streamed
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == server.tokens
    whole = claude.messages.create(model=CLAUDE, max_tokens=1024, messages=_user(text))
    assert whole.model_dump() == final.model_dump()
    assert _counts(server, before) == {"messages": 3}


def test_messages_max_tokens_stops_early(claude: anthropic.Anthropic, text: str) -> None:
    with claude.messages.stream(model=CLAUDE, max_tokens=3, messages=_user(text)) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 3


def test_messages_require_max_tokens(server: LocalOpenAIServer, text: str) -> None:
    before = server.request_counts
    status, _, raw = _raw(server, "/v1/messages", {"model": CLAUDE, "messages": _user(text)})
    assert status == 400
    error = json.loads(raw)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert server.request_counts == before


@pytest.mark.anyio
async def test_messages_async(
    server: LocalOpenAIServer, aclaude: anthropic.AsyncAnthropic, text: str
) -> None:
    before = server.request_counts
    events = [
        e
        async for e in await aclaude.messages.create(
            model=CLAUDE, max_tokens=1024, messages=_user(text), stream=True
        )
    ]
    assert events[-1].type == "message_stop"
    async with aclaude.messages.stream(
        model=CLAUDE, max_tokens=1024, messages=_user(text)
    ) as stream:
        final = await stream.get_final_message()
    whole = await aclaude.messages.create(model=CLAUDE, max_tokens=1024, messages=_user(text))
    assert whole.model_dump() == final.model_dump()
    assert final.stop_reason == "end_turn"
    assert _counts(server, before) == {"messages": 3}


# -- OpenAI Chat Completions and legacy Completions ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
def test_chat_and_legacy_wire_format_validates(
    server: LocalOpenAIServer, path: str, body: dict[str, Any]
) -> None:
    """Every chunk validates (not just constructs) as the SDK's type; [DONE] ends the body."""
    chat = path == "/v1/chat/completions"
    kind: type[ChatCompletionChunk | Completion] = ChatCompletionChunk if chat else Completion
    request = {**body, "model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = _raw(server, path, request)
    assert status == 200 and headers["x-request-id"].startswith("req_")
    events = _sse(raw)
    assert events[-1] == (None, "[DONE]")
    assert all(name is None for name, _ in events)  # plain `data:` lines, no event names
    payloads = [json.loads(data) for _, data in events[:-1]]
    assert len(payloads) == server.tokens + (3 if chat else 2)  # (role,) tokens, finish, usage
    if not chat:
        # The SDK's Completion type has no null finish_reason, which every legacy chunk but the
        # last carries on the wire (the SDK builds stream chunks without validating them).
        assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])
        payloads = payloads[-2:]
    chunks = [kind.model_validate(p) for p in payloads]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == server.tokens
    whole = (ChatCompletion if chat else Completion).model_validate_json(
        _raw(server, path, {**body, "model": MODEL})[2]
    )
    assert whole.usage is not None and whole.usage.completion_tokens == server.tokens


def test_chat_n_choices(server: LocalOpenAIServer, client: openai.OpenAI, text: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=_user(text),
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = ["", "", ""]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
    assert len(chunks) == 3 * (server.tokens + 2) + 1
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3 * server.tokens
    assert len(set(texts)) == 3  # each choice its own reply
    whole = client.chat.completions.create(model=MODEL, messages=_user(text), n=3)
    assert [c.message.content for c in whole.choices] == texts


def test_chat_request_id_header(client: openai.OpenAI, text: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=_user(text))
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse().choices[0].finish_reason == "stop"


def test_legacy_completions_usage_and_choices(
    server: LocalOpenAIServer, client: openai.OpenAI, text: str
) -> None:
    before = server.request_counts
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt=text,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) == 2 * (server.tokens + 1) + 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * server.tokens
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}
    assert _counts(server, before) == {"completions": 1}


@pytest.mark.anyio
async def test_chat_and_legacy_async(
    server: LocalOpenAIServer, aclient: openai.AsyncOpenAI, text: str
) -> None:
    before = server.request_counts
    stream = await aclient.chat.completions.create(model=MODEL, messages=_user(text), stream=True)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    legacy = await aclient.completions.create(model="gpt-3.5-turbo-instruct", prompt=text)
    assert legacy.choices[0].text
    assert _counts(server, before) == {"chat_completions": 1, "completions": 1}


# -- models --------------------------------------------------------------------------------------


def test_models_in_each_apis_shape(
    server: LocalOpenAIServer, client: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    before = server.request_counts
    assert [m.id for m in client.models.list()] == server.models
    claude_models = list(claude.models.list())
    assert [m.id for m in claude_models] == server.anthropic_models
    assert claude_models[0].display_name == "Claude Sonnet 4.6"
    assert _counts(server, before) == {"models": 2}
    assert server.request_count == before.generations  # listing models is not a generation


# -- failure injection ---------------------------------------------------------------------------

STREAMS = ["chat", "legacy", "responses", "messages"]


def _stream(
    kind: str, client: openai.OpenAI, claude: anthropic.Anthropic | None, text: str, mode: str
) -> Iterator[Any]:
    headers = _fail(mode)
    if kind == "chat":
        return iter(
            client.chat.completions.create(
                model=MODEL, messages=_user(text), stream=True, extra_headers=headers
            )
        )
    if kind == "legacy":
        return iter(
            client.completions.create(
                model="gpt-3.5-turbo-instruct", prompt=text, stream=True, extra_headers=headers
            )
        )
    if kind == "responses":
        return iter(
            client.responses.create(model=MODEL, input=text, stream=True, extra_headers=headers)
        )
    assert claude is not None
    return iter(
        claude.messages.create(
            model=CLAUDE, max_tokens=1024, messages=_user(text), stream=True, extra_headers=headers
        )
    )


def _drain(stream: Iterator[Any]) -> tuple[list[Any], BaseException | None]:
    got: list[Any] = []
    try:
        for item in stream:
            got.append(item)
    except Exception as exc:
        return got, exc
    return got, None


# What the SDK yields of the first FAIL_AFTER events (chat: 5 chunks; legacy: 5 chunks; the
# Responses API: 5 events; Messages: 5 events less the `ping` the SDK drops).
YIELDED = {"chat": FAIL_AFTER, "legacy": FAIL_AFTER, "responses": FAIL_AFTER, "messages": 4}
ENDPOINT = {
    "chat": "chat_completions",
    "legacy": "completions",
    "responses": "responses",
    "messages": "messages",
}


@pytest.mark.parametrize("kind", STREAMS)
def test_fail_close_drops_the_connection(
    server: LocalOpenAIServer,
    client: openai.OpenAI,
    claude: anthropic.Anthropic,
    text: str,
    kind: str,
) -> None:
    before = server.request_counts
    got, exc = _drain(_stream(kind, client, claude, text, "close"))
    assert exc is not None and _is_transport_error(exc), repr(exc)
    assert len(got) == YIELDED[kind]
    assert _counts(server, before) == {ENDPOINT[kind]: 1}


@pytest.mark.parametrize("kind", ["chat", "legacy", "messages"])
def test_fail_error_raises_the_apis_error(
    client: openai.OpenAI, claude: anthropic.Anthropic, text: str, kind: str
) -> None:
    got, exc = _drain(_stream(kind, client, claude, text, "error"))
    assert len(got) == YIELDED[kind]
    if kind == "messages":
        assert isinstance(exc, anthropic.APIStatusError)
        assert exc.body == {
            "type": "error",
            "error": {"type": "api_error", "message": str(exc.body["error"]["message"])},  # type: ignore[index]
        }
    else:
        assert isinstance(exc, openai.APIError)
        assert exc.code == "injected_failure"


def test_fail_error_responses_sends_error_then_failed(
    client: openai.OpenAI, claude: anthropic.Anthropic, text: str
) -> None:
    got, exc = _drain(_stream("responses", client, claude, text, "error"))
    assert exc is None  # the SDK hands the events over; the caller sees the failure
    assert [e.type for e in got[FAIL_AFTER:]] == ["error", "response.failed"]
    error, failed = got[FAIL_AFTER:]
    assert error.sequence_number == FAIL_AFTER and failed.sequence_number == FAIL_AFTER + 1
    assert failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.code == "server_error"
    with (
        client.responses.stream(model=MODEL, input=text, extra_headers=_fail("error")) as stream,
        pytest.raises(RuntimeError, match=r"response\.completed"),
    ):
        stream.get_final_response()


RAW_STREAM_REQUESTS: dict[str, Callable[[str], tuple[str, dict[str, Any]]]] = {
    "chat": lambda t: (
        "/v1/chat/completions",
        {"model": MODEL, "messages": _user(t), "stream": True},
    ),
    "legacy": lambda t: ("/v1/completions", {"model": MODEL, "prompt": t, "stream": True}),
    "responses": lambda t: ("/v1/responses", {"model": MODEL, "input": t, "stream": True}),
    "messages": lambda t: (
        "/v1/messages",
        {"model": CLAUDE, "max_tokens": 1024, "messages": _user(t), "stream": True},
    ),
}


@pytest.mark.parametrize("kind", STREAMS)
def test_fail_end_stops_cleanly_without_the_terminal_event(
    server: LocalOpenAIServer, kind: str, text: str
) -> None:
    path, body = RAW_STREAM_REQUESTS[kind](text)
    status, _, whole = _raw(server, path, body)
    _, _, cut = _raw(server, path, body, _fail("end"))
    _, _, almost = _raw(server, path, body, _fail("end", after=len(_sse(whole)) - 1))
    assert status == 200
    assert _sse(cut) == _sse(whole)[:FAIL_AFTER]
    assert _sse(almost) == _sse(whole)[:-1]  # everything but [DONE] / completed / message_stop
    terminal = _sse(whole)[-1]
    assert terminal in [
        (None, "[DONE]"),
        ("response.completed", terminal[1]),
        ("message_stop", '{"type": "message_stop"}'),
    ]


def test_fail_end_through_the_sdks(
    client: openai.OpenAI, claude: anthropic.Anthropic, text: str
) -> None:
    for kind in STREAMS:
        got, exc = _drain(_stream(kind, client, claude, text, "end"))
        assert exc is None, kind
        assert len(got) == YIELDED[kind], kind
    with (
        client.responses.stream(model=MODEL, input=text, extra_headers=_fail("end")) as stream,
        pytest.raises(RuntimeError, match=r"response\.completed"),
    ):
        stream.get_final_response()


@pytest.mark.parametrize("mode", ["close", "error", "end"])
def test_fail_non_streamed(
    client: openai.OpenAI, claude: anthropic.Anthropic, text: str, mode: str
) -> None:
    expected: tuple[type[Exception], ...] = (
        (openai.APIConnectionError, anthropic.APIConnectionError)
        if mode == "close"
        else (openai.InternalServerError, anthropic.InternalServerError)
    )
    headers = _fail(mode)
    with pytest.raises(expected[0]):
        client.chat.completions.create(model=MODEL, messages=_user(text), extra_headers=headers)
    with pytest.raises(expected[0]):
        client.responses.create(model=MODEL, input=text, extra_headers=headers)
    with pytest.raises(expected[1]):
        claude.messages.create(
            model=CLAUDE, max_tokens=1024, messages=_user(text), extra_headers=headers
        )


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["close", "error", "end"])
async def test_fail_async(
    aclient: openai.AsyncOpenAI, aclaude: anthropic.AsyncAnthropic, text: str, mode: str
) -> None:
    headers = _fail(mode)
    events: list[Any] = []
    exc: BaseException | None = None
    try:
        async for e in await aclient.responses.create(
            model=MODEL, input=text, stream=True, extra_headers=headers
        ):
            events.append(e)
    except Exception as caught:
        exc = caught
    types = [e.type for e in events]
    assert types[:FAIL_AFTER] == [*RESPONSES_SEQUENCE_HEAD, "response.output_text.delta"]
    assert "response.completed" not in types
    if mode == "close":
        assert exc is not None and _is_transport_error(exc)
    else:
        assert exc is None
        assert types[FAIL_AFTER:] == (["error", "response.failed"] if mode == "error" else [])

    chunks: list[Any] = []
    exc = None
    try:
        chat = await aclient.chat.completions.create(
            model=MODEL, messages=_user(text), stream=True, extra_headers=headers
        )
        async for chunk in chat:
            chunks.append(chunk)
    except Exception as caught:
        exc = caught
    assert len(chunks) == FAIL_AFTER
    if mode == "close":
        assert exc is not None and _is_transport_error(exc)
    elif mode == "error":
        assert isinstance(exc, openai.APIError)
    else:
        assert exc is None

    messages: list[Any] = []
    exc = None
    try:
        async with aclaude.messages.stream(
            model=CLAUDE, max_tokens=1024, messages=_user(text), extra_headers=headers
        ) as stream:
            async for m in stream:
                messages.append(m)
    except Exception as caught:
        exc = caught
    assert "message_stop" not in [m.type for m in messages]
    if mode == "close":
        assert exc is not None and _is_transport_error(exc)
    elif mode == "error":
        assert isinstance(exc, anthropic.APIStatusError)
    else:
        assert exc is None


def test_fail_attributes_and_bad_header(text: str) -> None:
    with (
        LocalOpenAIServer(
            first_token_delay=0, token_interval=0, tokens=6, fail_after=3, fail_mode="error"
        ) as srv,
        anthropic.Anthropic(base_url=srv.anthropic_base_url, api_key="x", max_retries=0) as c,
    ):
        with pytest.raises(anthropic.APIStatusError):
            for _ in c.messages.create(
                model=CLAUDE, max_tokens=10, messages=_user(text), stream=True
            ):
                pass
        # a header wins over the attributes
        events = list(
            c.messages.create(
                model=CLAUDE,
                max_tokens=10,
                messages=_user(text),
                stream=True,
                extra_headers={"x-chengeta-fail-after": "100"},
            )
        )
        assert events[-1].type == "message_stop"
        with pytest.raises(anthropic.BadRequestError):
            c.messages.create(
                model=CLAUDE,
                max_tokens=10,
                messages=_user(text),
                extra_headers={"x-chengeta-fail-after": "soon"},
            )
        assert srv.request_counts == RequestCounts(messages=2)
        srv.reset_count()
        assert srv.request_count == 0


# -- lifecycle -----------------------------------------------------------------------------------


def _server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("LocalOpenAIServer:")]


def test_stop_drops_streams_in_flight_and_leaves_nothing_behind(text: str) -> None:
    threads_before = _server_threads()
    srv = LocalOpenAIServer(first_token_delay=0, token_interval=0.01, tokens=10_000).start()
    port = srv.port
    with openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c:
        stream = c.responses.create(model=MODEL, input=text, stream=True)
        events = iter(stream)
        assert next(events).type == "response.created"
        srv.stop()
        got, exc = _drain(events)
        assert exc is not None and _is_transport_error(exc)
        assert "response.completed" not in [e.type for e in got]
        stream.close()
    assert _server_threads() == threads_before
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
    srv.stop()  # idempotent


def test_restart_after_stop(text: str) -> None:
    srv = LocalOpenAIServer(first_token_delay=0, token_interval=0, tokens=3)
    for _ in range(2):
        with srv, openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c:
            assert c.responses.create(model=MODEL, input=text).status == "completed"
    assert srv.request_count == 2
    with pytest.raises(RuntimeError):
        _ = srv.anthropic_base_url


def test_dropped_connections_are_not_logged_as_server_errors(
    server: LocalOpenAIServer,
    client: openai.OpenAI,
    text: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn logs an exception escaping the app; the injected drop is filtered out."""
    with caplog.at_level(logging.DEBUG, logger="uvicorn.error"):
        got, exc = _drain(_stream("chat", client, None, text, "close"))
        assert exc is not None and len(got) == FAIL_AFTER
        # a request after the drop: the server thread has handled the abort by then
        assert client.chat.completions.create(model=MODEL, messages=_user(text)).choices
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_unknown_path_and_wrong_method_answer_an_api_error(server: LocalOpenAIServer) -> None:
    status, _, raw = _raw(server, "/v1/nope", {})
    assert (status, json.loads(raw)["error"]["code"]) == (404, "not_found")
    req = urllib.request.Request(server.base_url + "/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as info, urllib.request.urlopen(req, timeout=10):
        pass
    with info.value as error:
        assert error.code == 405
        assert json.loads(error.read())["error"]["type"] == "invalid_request_error"
    status, _, raw = _raw(server, "/v1/messages/nope", {})
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("after", [0, 3, FAIL_AFTER, 10])
def test_error_events_parse_with_the_sdk_types(
    server: LocalOpenAIServer, text: str, after: int
) -> None:
    """The injected error events are the APIs' own: validated, not just constructed."""
    path, body = RAW_STREAM_REQUESTS["responses"](text)
    _, _, raw = _raw(server, path, body, _fail("error", after))
    events = _sse(raw)
    parsed = [RESPONSE_EVENTS.validate_json(data) for _, data in events]
    assert [name for name, _ in events[-2:]] == ["error", "response.failed"]
    assert [e.type for e in parsed[-2:]] == ["error", "response.failed"]
    assert [e.sequence_number for e in parsed] == list(range(after + 2))
    failed = parsed[-1].response
    assert failed.status == "failed" and failed.error is not None
    if after:
        assert failed.id == parsed[0].response.id  # the response that was created

    path, body = RAW_STREAM_REQUESTS["messages"](text)
    _, _, raw = _raw(server, path, body, _fail("error", after))
    events = _sse(raw)
    assert len(events) == after + 1 and events[-1][0] == "error"
    error = ErrorResponse.model_validate_json(events[-1][1])
    assert error.error.type == "api_error"

    path, body = RAW_STREAM_REQUESTS["chat"](text)
    _, _, raw = _raw(server, path, body, _fail("error", after))
    events = _sse(raw)
    assert len(events) == after + 1 and events[-1][0] is None
    assert json.loads(events[-1][1])["error"]["type"] == "server_error"
