"""Realistic OpenAI streams for tests, benchmarks and the demo server.

`openai_chunk_dicts` yields the JSON payloads that OpenAI's ``/v1/chat/completions`` sends with
``stream=True`` (one per SSE ``data:`` line), shaped as the API sends them today: a role chunk
first, one content token per chunk, a ``finish_reason`` chunk, optionally a usage chunk, and the
``obfuscation`` padding field on every chunk. `openai_chunks` turns them into the SDK's
``ChatCompletionChunk`` objects exactly as the ``openai`` client does when it parses a stream.

Obfuscation model: OpenAI pads each streamed event with random alphanumeric characters "to
normalize payload sizes"; here each chunk gets ``max(1, 16 - len(content))`` random characters
from ``[A-Za-z0-9]`` less a random 0-3, which reproduces the 1-16 character values seen in
real streams. It is incompressible by design, so it dominates the encoded size.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from typing import Any

__all__ = ["TEXT", "openai_chunk_dicts", "openai_chunks", "tokenize"]

TEXT = (
    "Caching stores the result of an expensive computation so that the next identical request "
    "can be answered without repeating the work. For streamed language model responses, the "
    "cache forwards each chunk to the caller as it arrives, keeps a copy, and stores the whole "
    "stream once it ends normally; a later identical request replays the stored chunks as a "
    "stream, so the caller cannot tell the difference except that it is much faster. Identical "
    "requests that arrive while the first stream is still running join it instead of calling "
    "the model again, which saves tokens, money and rate limit. "
)

_ALNUM = string.ascii_letters + string.digits


def tokenize(text: str) -> list[str]:
    """Split text into GPT-like tokens: words with their leading space, punctuation apart."""
    tokens: list[str] = []
    word = ""
    for ch in text:
        if ch.isalnum() or ch == "'":
            word += ch
        else:
            if word:
                tokens.append(word)
                word = ""
            if ch == " ":
                word = " "
            else:
                tokens.append(ch)
    if word.strip():
        tokens.append(word)
    return [t for t in tokens if t]


def _obfuscation(rng: random.Random, content: str) -> str:
    n = max(1, 16 - len(content) - rng.randint(0, 3))
    return "".join(rng.choice(_ALNUM) for _ in range(n))


def openai_chunk_dicts(
    n_tokens: int,
    *,
    seed: int = 0,
    model: str = "gpt-4o-2024-08-06",
    text: str = TEXT,
    include_usage: bool = False,
    include_obfuscation: bool = True,
    completion_id: str | None = None,
    created: int = 1_764_288_000,
) -> Iterator[dict[str, Any]]:
    """Yield the payloads of a streamed chat completion with ``n_tokens`` content chunks.

    The stream has ``n_tokens + 2`` chunks (role, tokens, finish), plus one with usage.
    Deterministic for a given seed.
    """
    rng = random.Random(seed)
    base = tokenize(text)
    cid = completion_id or "chatcmpl-" + "".join(rng.choice(_ALNUM) for _ in range(29))
    head = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_" + "".join(rng.choice("0123456789abcdef") for _ in range(10)),
    }

    def chunk(delta: dict[str, Any], finish: str | None, content: str) -> dict[str, Any]:
        d: dict[str, Any] = dict(head)
        d["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if include_usage:
            d["usage"] = None
        if include_obfuscation:
            d["obfuscation"] = _obfuscation(rng, content)
        return d

    yield chunk({"role": "assistant", "content": "", "refusal": None}, None, "")
    for i in range(n_tokens):
        tok = base[i % len(base)]
        yield chunk({"content": tok}, None, tok)
    yield chunk({}, "stop", "")
    if include_usage:
        d = dict(head)
        d["choices"] = []
        d["usage"] = {
            "prompt_tokens": 14,
            "completion_tokens": n_tokens,
            "total_tokens": 14 + n_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        if include_obfuscation:
            d["obfuscation"] = _obfuscation(rng, "")
        yield d


def openai_chunks(n_tokens: int, **kwargs: Any) -> list[Any]:
    """`openai_chunk_dicts` as ``openai.types.chat.ChatCompletionChunk`` objects.

    Built the way the ``openai`` client builds them from a stream (``construct``: no
    validation, unknown keys such as ``obfuscation`` kept as extra fields).
    """
    try:
        from openai.types.chat import ChatCompletionChunk
    except ImportError as exc:
        from chengeta_ai._optional import missing_extra

        raise missing_extra("openai", "openai_chunks") from exc

    return [ChatCompletionChunk.construct(**d) for d in openai_chunk_dicts(n_tokens, **kwargs)]
