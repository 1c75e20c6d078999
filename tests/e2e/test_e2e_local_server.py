"""The local OpenAI-compatible server, checked with the real ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from chengeta_ai.demo.server import LocalOpenAIServer

MODEL = "gpt-4o-mini"


def _client(server: LocalOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0)


def _post(server: LocalOpenAIServer, path: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(
        server.base_url + path,
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stream_shape(server: LocalOpenAIServer, prompt: list[dict[str, str]]) -> None:
    before = server.request_count
    chunks = list(
        _client(server).chat.completions.create(model=MODEL, messages=prompt, stream=True)
    )
    assert server.request_count - before == 1
    assert len(chunks) == server.tokens + 2
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.model == MODEL for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(isinstance(c.obfuscation, str) and c.obfuscation for c in chunks)  # type: ignore[attr-defined]
    assert len({c.id for c in chunks}) == 1
    assert _text(chunks).strip()


def test_deterministic_per_prompt(server: LocalOpenAIServer) -> None:
    client = _client(server)

    def run(content: str) -> list[dict[str, Any]]:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], stream=True
        )
        return [c.model_dump(exclude_unset=True) for c in stream]

    assert run("same prompt") == run("same prompt")
    assert run("same prompt") != run("another prompt")


def test_usage_and_obfuscation_options(server: LocalOpenAIServer, prompt: list[Any]) -> None:
    client = _client(server)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=prompt,
            stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False},
        )
    )
    assert len(chunks) == server.tokens + 3
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == server.tokens
    assert all("obfuscation" not in c.model_dump(exclude_unset=True) for c in chunks)


def test_raw_sse_wire_format(server: LocalOpenAIServer, prompt: list[Any]) -> None:
    body = json.dumps({"model": MODEL, "messages": prompt, "stream": True}).encode()
    status, raw = _post(server, "/chat/completions", body)
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len(payloads) == server.tokens + 2
    assert payloads[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }


def test_non_stream_completion(server: LocalOpenAIServer, prompt: list[Any]) -> None:
    client = _client(server)
    streamed = _text(
        list(client.chat.completions.create(model="gpt-4o", messages=prompt, stream=True))
    )
    completion = client.chat.completions.create(model="gpt-4o", messages=prompt)
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == streamed
    assert completion.choices[0].finish_reason == "stop"


def test_legacy_completions(server: LocalOpenAIServer) -> None:
    client = _client(server)
    chunks = list(
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True)
    )
    assert len(chunks) == server.tokens + 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].text for c in chunks)
    full = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert full.choices[0].text == text


def test_bad_json_is_400_with_openai_error_body(server: LocalOpenAIServer) -> None:
    before = server.request_count
    status, raw = _post(server, "/chat/completions", b"{not json")
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
    assert server.request_count == before  # not a completion request


def test_missing_messages_is_bad_request(server: LocalOpenAIServer) -> None:
    status, raw = _post(server, "/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400
    assert "messages" in json.loads(raw)["error"]["message"]


def test_unknown_path_is_404(server: LocalOpenAIServer) -> None:
    status, raw = _post(server, "/nope", b"{}")
    assert status == 404
    assert "error" in json.loads(raw)


@pytest.mark.parametrize(
    ("mode", "error"),
    [("close", openai.APIConnectionError), ("error", openai.APIError)],
)
def test_failure_header_mid_stream(
    server: LocalOpenAIServer, prompt: list[Any], mode: str, error: type[Exception]
) -> None:
    got: list[Any] = []
    with pytest.raises(error):
        for chunk in _client(server).chat.completions.create(
            model=MODEL,
            messages=prompt,
            stream=True,
            extra_headers={"x-chengeta-fail-after": "4", "x-chengeta-fail-mode": mode},
        ):
            got.append(chunk)
    assert len(got) == 4


def test_failure_attribute(prompt: list[Any]) -> None:
    with LocalOpenAIServer(first_token_delay=0, token_interval=0, tokens=5, fail_after=2) as srv:
        got: list[Any] = []
        with pytest.raises(openai.APIConnectionError):
            for chunk in _client(srv).chat.completions.create(
                model=MODEL, messages=prompt, stream=True
            ):
                got.append(chunk)
        assert len(got) == 2
        srv.fail_after = None
        assert (
            len(
                list(
                    _client(srv).chat.completions.create(model=MODEL, messages=prompt, stream=True)
                )
            )
            == 7
        )
        assert srv.request_count == 2


@pytest.mark.anyio
async def test_async_client_streams(server: LocalOpenAIServer, prompt: list[Any]) -> None:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="local", max_retries=0) as c:
        chunks = [
            chunk
            async for chunk in await c.chat.completions.create(
                model=MODEL, messages=prompt, stream=True
            )
        ]
    sync_chunks = list(
        _client(server).chat.completions.create(model=MODEL, messages=prompt, stream=True)
    )
    assert chunks == sync_chunks


def test_stop_is_idempotent_and_base_url_requires_start() -> None:
    srv = LocalOpenAIServer()
    with pytest.raises(RuntimeError):
        _ = srv.base_url
    srv.start()
    assert srv.base_url.startswith("http://127.0.0.1:")
    srv.stop()
    srv.stop()
