"""The wire formats of the APIs the local server speaks: pure functions, no I/O.

Each ``*_script`` function turns a request body into a `Script`: the Server-Sent Events of the
streamed reply, in order, exactly as the real API frames them, plus the terminal event(s) and a
builder for the API's own mid-stream error event. The non-streaming bodies are built from the
same data, so a streamed and a non-streamed reply to one prompt carry the same text.

- OpenAI Chat Completions (``/v1/chat/completions``): ``data: {chunk}`` per chunk, then
  ``data: [DONE]``; chunks from `chengeta_ai.testing.openai_chunk_dicts` (role chunk, one token
  per chunk, finish chunk, optional usage chunk, the ``obfuscation`` field); ``n`` > 1 choices
  are interleaved chunk by chunk.
- OpenAI legacy Completions (``/v1/completions``): the same framing, ``text_completion`` chunks.
- OpenAI Responses (``/v1/responses``): ``event: <type>`` + ``data: {..., "sequence_number"}``:
  ``response.created``, ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta`` (with ``obfuscation``) per
  token, ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, then the terminal ``response.completed``.
- Anthropic Messages (``/v1/messages``): ``message_start``, ``content_block_start``, ``ping``,
  ``content_block_delta`` (``text_delta``) per token, ``content_block_stop``,
  ``message_delta`` (stop reason, usage), then the terminal ``message_stop``.

The content is deterministic per request: the seed is a hash of the prompt (``messages``,
``prompt`` or ``input``), so the same prompt gives the same reply whatever the model, and the
requested model is echoed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from chengeta_ai.testing import (
    TEXT,
    _obfuscation,  # the padding model of the chunks, shared so there is one copy of it
    openai_chunk_dicts,
    tokenize,
)

__all__ = [
    "CREATED",
    "ENDPOINTS",
    "FAIL_AFTER_HEADER",
    "FAIL_MODE_HEADER",
    "INJECTED",
    "Endpoint",
    "FailMode",
    "Frame",
    "Script",
    "anthropic_error_body",
    "anthropic_message",
    "anthropic_script",
    "chat_completion",
    "chat_script",
    "completion",
    "completion_script",
    "openai_error_body",
    "reply_tokens",
    "response_body",
    "response_object",
    "responses_script",
    "seed_for",
    "text_for",
]

#: How a streamed reply fails when asked to (see `chengeta_ai.demo.app`).
FailMode = Literal["close", "error", "end"]
#: The endpoints the local server counts requests for.
Endpoint = Literal["chat_completions", "completions", "responses", "messages", "models"]
ENDPOINTS: tuple[Endpoint, ...] = (
    "chat_completions",
    "completions",
    "responses",
    "messages",
    "models",
)
FAIL_AFTER_HEADER = "x-chengeta-fail-after"
FAIL_MODE_HEADER = "x-chengeta-fail-mode"

CREATED = 1_764_288_000
PROMPT_TOKENS = 14
INJECTED = "The server had an error while processing your request. (injected failure)"

_SENTENCES = [s.strip() for s in TEXT.split(". ") if s.strip()]
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_HEX = "0123456789abcdef"


class Frame(NamedTuple):
    """One SSE event on the wire. ``paced``: a model token (or the reply's first event), sent
    after the first-token delay (the first paced frame) or the token interval (the others);
    unpaced frames (bookkeeping events) follow the previous frame at once."""

    data: bytes
    paced: bool = True


class Script(NamedTuple):
    """A streamed reply: ``events`` then ``terminal``; ``error(i)`` is what the API sends when
    it fails after ``i`` events (its own error event(s); the body then ends)."""

    events: list[Frame]
    terminal: list[Frame]
    error: Callable[[int], list[Frame]]


# -- shared ------------------------------------------------------------------------------------


def seed_for(payload: Any) -> int:
    """A stable 64-bit seed for a JSON-able value (the request's prompt)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


def text_for(seed: int) -> str:
    """The reply text for a seed: the sentences of `TEXT`, rotated by the seed."""
    k = seed % len(_SENTENCES)
    rotated = _SENTENCES[k:] + _SENTENCES[:k]
    return ". ".join(s.rstrip(".") for s in rotated) + ". "


def reply_tokens(seed: int, n: int) -> list[str]:
    """The first ``n`` tokens of the reply for a seed (the text repeats if it is too short);
    the same tokens `openai_chunk_dicts` streams for that seed."""
    base = tokenize(text_for(seed))
    return [base[i % len(base)] for i in range(n)]


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"


def openai_error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body (HTTP errors and the chat stream's error event)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def anthropic_error_body(message: str, type_: str = "invalid_request_error") -> dict[str, Any]:
    """Anthropic's error body (HTTP errors and the stream's ``error`` event)."""
    return {"type": "error", "error": {"type": type_, "message": message}}


# -- OpenAI Chat Completions ------------------------------------------------------------------


def _chat_chunk_dicts(
    body: dict[str, Any], *, tokens: int, model: str, seed: int, n: int, stream: bool
) -> list[dict[str, Any]]:
    """The chunk payloads of a chat reply with ``n`` choices, interleaved round robin."""
    opts = (body.get("stream_options") or {}) if stream else {}
    include_usage = bool(opts.get("include_usage", False))
    obfuscate = stream and bool(opts.get("include_obfuscation", True))
    per_choice = [
        list(
            openai_chunk_dicts(
                tokens,
                seed=seed + i,
                model=model,
                text=text_for(seed + i),
                include_usage=include_usage,
                include_obfuscation=obfuscate,
            )
        )
        for i in range(n)
    ]
    if n == 1:
        return per_choice[0]
    head = per_choice[0][0]
    usage = per_choice[0][-1] if include_usage else None
    lanes: list[list[dict[str, Any]]] = []
    for i, chunks in enumerate(per_choice):
        lane = []
        for chunk in chunks:
            if not chunk["choices"]:
                continue  # the usage chunk: one for all choices, at the end
            chunk["id"] = head["id"]
            chunk["system_fingerprint"] = head["system_fingerprint"]
            chunk["choices"][0]["index"] = i
            lane.append(chunk)
        lanes.append(lane)
    out = [lane[k] for k in range(len(lanes[0])) for lane in lanes]
    if usage is not None:
        u = usage["usage"]
        u["completion_tokens"] = n * tokens
        u["total_tokens"] = PROMPT_TOKENS + n * tokens
        out.append(usage)
    return out


def _openai_error_frames(_: int) -> list[Frame]:
    return [Frame(_data(openai_error_body(INJECTED, "server_error", "injected_failure")))]


def chat_script(body: dict[str, Any], *, tokens: int, model: str, seed: int, n: int) -> Script:
    """The streamed reply of ``POST /v1/chat/completions``."""
    chunks = _chat_chunk_dicts(body, tokens=tokens, model=model, seed=seed, n=n, stream=True)
    return Script(
        [Frame(_data(c)) for c in chunks], [Frame(b"data: [DONE]\n\n")], _openai_error_frames
    )


def _usage(completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def _chat_usage(completion_tokens: int) -> dict[str, Any]:
    """A whole chat reply's usage: with the token details, as in the streamed usage chunk
    (`chengeta_ai.testing.openai_chunk_dicts`) and as the API sends them in both modes."""
    return {
        **_usage(completion_tokens),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _texts(chunks: list[dict[str, Any]], n: int, key: str) -> list[str]:
    texts = [""] * n
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += (choice["delta"] if key == "content" else choice).get(
                key
            ) or ""
    return texts


def chat_completion(
    body: dict[str, Any], *, tokens: int, model: str, seed: int, n: int
) -> dict[str, Any]:
    """The body of a non-streamed ``POST /v1/chat/completions`` (a ``chat.completion``)."""
    chunks = _chat_chunk_dicts(body, tokens=tokens, model=model, seed=seed, n=n, stream=False)
    head = chunks[0]
    return {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i, text in enumerate(_texts(chunks, n, "content"))
        ],
        "usage": _chat_usage(n * tokens),
        "service_tier": head["service_tier"],
        "system_fingerprint": head["system_fingerprint"],
    }


# -- OpenAI legacy Completions ----------------------------------------------------------------


def _legacy_chunk_dicts(
    body: dict[str, Any], *, tokens: int, model: str, seed: int, n: int, stream: bool
) -> list[dict[str, Any]]:
    """Chat chunk payloads turned into legacy ``text_completion`` payloads (no role chunks)."""
    out: list[dict[str, Any]] = []
    chat = _chat_chunk_dicts(body, tokens=tokens, model=model, seed=seed, n=n, stream=stream)
    for d in chat:
        head = {
            "id": "cmpl-" + d["id"].removeprefix("chatcmpl-"),
            "object": "text_completion",
            "created": d["created"],
            "model": d["model"],
            "system_fingerprint": d["system_fingerprint"],
        }
        if not d["choices"]:  # the usage chunk
            out.append({**head, "choices": [], "usage": d["usage"]})
            continue
        choice = d["choices"][0]
        if "role" in choice["delta"]:
            continue  # the legacy API has no role chunk
        text = choice["delta"].get("content") or ""
        finish = choice["finish_reason"]
        legacy = {"text": text, "index": choice["index"], "logprobs": None, "finish_reason": finish}
        out.append({**head, "choices": [legacy]})
    return out


def completion_script(
    body: dict[str, Any], *, tokens: int, model: str, seed: int, n: int
) -> Script:
    """The streamed reply of ``POST /v1/completions``."""
    chunks = _legacy_chunk_dicts(body, tokens=tokens, model=model, seed=seed, n=n, stream=True)
    return Script(
        [Frame(_data(c)) for c in chunks], [Frame(b"data: [DONE]\n\n")], _openai_error_frames
    )


def completion(
    body: dict[str, Any], *, tokens: int, model: str, seed: int, n: int
) -> dict[str, Any]:
    """The body of a non-streamed ``POST /v1/completions`` (a ``text_completion``)."""
    chunks = _legacy_chunk_dicts(body, tokens=tokens, model=model, seed=seed, n=n, stream=False)
    head = chunks[0]
    return {
        "id": head["id"],
        "object": "text_completion",
        "created": head["created"],
        "model": model,
        "system_fingerprint": head["system_fingerprint"],
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, text in enumerate(_texts(chunks, n, "text"))
        ],
        "usage": _usage(n * tokens),
    }


# -- OpenAI Responses -------------------------------------------------------------------------


class _ResponseParts(NamedTuple):
    response_id: str
    item_id: str
    tokens: list[str]
    obfuscation: list[str]


def _response_parts(seed: int, tokens: int) -> _ResponseParts:
    rng = random.Random(seed)
    toks = reply_tokens(seed, tokens)
    return _ResponseParts(
        "resp_" + _rand(rng, _HEX, 50),
        "msg_" + _rand(rng, _HEX, 50),
        toks,
        [_obfuscation(rng, t) for t in toks],
    )


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def response_object(
    body: dict[str, Any],
    *,
    model: str,
    response_id: str,
    status: str,
    output: list[dict[str, Any]],
    output_tokens: int | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``Response`` object in the given state; ``output_tokens`` set: with usage."""
    text_config = body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"}
    usage = None
    if output_tokens is not None:
        usage = {
            "input_tokens": PROMPT_TOKENS,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": PROMPT_TOKENS + output_tokens,
        }
    return {
        "id": response_id,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "background": False,
        "completed_at": CREATED + 1 if status == "completed" else None,
        "error": error,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": bool(body.get("store", True)),
        "temperature": body.get("temperature", 1.0),
        "text": text_config,
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def responses_script(body: dict[str, Any], *, tokens: int, model: str, seed: int) -> Script:
    """The streamed reply of ``POST /v1/responses``."""
    parts = _response_parts(seed, tokens)
    opts = body.get("stream_options") or {}
    obfuscate = bool(opts.get("include_obfuscation", True))
    rid, iid = parts.response_id, parts.item_id
    text = "".join(parts.tokens)
    where = {"item_id": iid, "output_index": 0, "content_index": 0}
    done_item = _message_item(iid, "completed", [_output_text(text)])

    def resp(status: str, **kw: Any) -> dict[str, Any]:
        return response_object(body, model=model, response_id=rid, status=status, **kw)

    seq = 0

    def ev(name: str, paced: bool, **fields: Any) -> Frame:
        nonlocal seq
        frame = Frame(_event(name, {"type": name, "sequence_number": seq, **fields}), paced)
        seq += 1
        return frame

    events = [
        ev("response.created", False, response=resp("in_progress", output=[])),
        ev("response.in_progress", False, response=resp("in_progress", output=[])),
        ev(
            "response.output_item.added",
            True,
            output_index=0,
            item=_message_item(iid, "in_progress", []),
        ),
        ev("response.content_part.added", False, **where, part=_output_text("")),
    ]
    for i, (tok, pad) in enumerate(zip(parts.tokens, parts.obfuscation, strict=True)):
        extra = {"obfuscation": pad} if obfuscate else {}
        # the first delta follows output_item.added at once: the first-token delay came before
        events.append(
            ev("response.output_text.delta", i > 0, **where, delta=tok, logprobs=[], **extra)
        )
    events += [
        ev("response.output_text.done", False, **where, text=text, logprobs=[]),
        ev("response.content_part.done", False, **where, part=_output_text(text)),
        ev("response.output_item.done", False, output_index=0, item=done_item),
    ]
    completed = resp("completed", output=[done_item], output_tokens=tokens)
    terminal = [ev("response.completed", False, response=completed)]

    def error(after: int) -> list[Frame]:
        # `event: error`, then the response's own terminal state `response.failed`
        err = {"code": "server_error", "message": INJECTED, "param": None}
        failed = resp("failed", output=[], error={"code": "server_error", "message": INJECTED})
        return [
            Frame(_event("error", {"type": "error", "sequence_number": after, **err}), False),
            Frame(
                _event(
                    "response.failed",
                    {"type": "response.failed", "sequence_number": after + 1, "response": failed},
                ),
                False,
            ),
        ]

    return Script(events, terminal, error)


def response_body(body: dict[str, Any], *, tokens: int, model: str, seed: int) -> dict[str, Any]:
    """The body of a non-streamed ``POST /v1/responses``: the completed ``Response``."""
    parts = _response_parts(seed, tokens)
    item = _message_item(parts.item_id, "completed", [_output_text("".join(parts.tokens))])
    return response_object(
        body,
        model=model,
        response_id=parts.response_id,
        status="completed",
        output=[item],
        output_tokens=tokens,
    )


# -- Anthropic Messages -----------------------------------------------------------------------


class _MessageParts(NamedTuple):
    message_id: str
    tokens: list[str]
    stop_reason: str


def _message_parts(body: dict[str, Any], seed: int, tokens: int) -> _MessageParts:
    rng = random.Random(seed)
    max_tokens = body.get("max_tokens")
    stop = "end_turn"
    if isinstance(max_tokens, int) and 0 < max_tokens < tokens:
        tokens, stop = max_tokens, "max_tokens"
    return _MessageParts("msg_01" + _rand(rng, _ALNUM, 22), reply_tokens(seed, tokens), stop)


def _anthropic_usage(output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": PROMPT_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _message(
    parts: _MessageParts, model: str, content: list[dict[str, Any]], stop: str | None, out: int
) -> dict[str, Any]:
    return {
        "id": parts.message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _anthropic_usage(out),
    }


def anthropic_script(body: dict[str, Any], *, tokens: int, model: str, seed: int) -> Script:
    """The streamed reply of ``POST /v1/messages``."""
    parts = _message_parts(body, seed, tokens)

    def ev(name: str, paced: bool, **fields: Any) -> Frame:
        return Frame(_event(name, {"type": name, **fields}), paced)

    events = [
        ev("message_start", True, message=_message(parts, model, [], None, 1)),
        ev("content_block_start", False, index=0, content_block={"type": "text", "text": ""}),
        ev("ping", False),
    ]
    for i, tok in enumerate(parts.tokens):
        delta = {"type": "text_delta", "text": tok}
        events.append(ev("content_block_delta", i > 0, index=0, delta=delta))
    events += [
        ev("content_block_stop", False, index=0),
        ev(
            "message_delta",
            False,
            delta={"stop_reason": parts.stop_reason, "stop_sequence": None},
            usage={"output_tokens": len(parts.tokens)},
        ),
    ]

    def error(_: int) -> list[Frame]:
        return [Frame(_event("error", anthropic_error_body(INJECTED, "api_error")), False)]

    return Script(events, [ev("message_stop", False)], error)


def anthropic_message(
    body: dict[str, Any], *, tokens: int, model: str, seed: int
) -> dict[str, Any]:
    """The body of a non-streamed ``POST /v1/messages`` (a ``Message``)."""
    parts = _message_parts(body, seed, tokens)
    text = {"type": "text", "text": "".join(parts.tokens)}
    return _message(parts, model, [text], parts.stop_reason, len(parts.tokens))
