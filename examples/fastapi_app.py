"""FastAPI recipe: stream cached LLM answers to browsers as server-sent events.

Each request streams the answer as SSE (``text/event-stream``): one ``data:`` event per chunk,
the chunk's JSON as OpenAI sends it, then ``data: [DONE]``, so any SSE client (``EventSource``,
the ``openai`` SDK's own parser) reads it. Identical requests that arrive while an answer
streams share its one upstream call; later ones are replayed from the cache. A client that
disconnects leaves the others untouched; if it was the only one, the upstream call is closed
and nothing is stored (never a truncated answer).

One process (in-flight sharing per process, an in-memory cache):

    OPENAI_API_KEY=... uvicorn examples.fastapi_app:app

Every worker of ``uvicorn --workers N`` sharing one upstream call per prompt: set
``CHENGETA_REDIS_URL`` and each worker stores in Redis (`RedisBackend`) and shares in-flight
streams through it (`RedisFlights`):

    CHENGETA_REDIS_URL=redis://127.0.0.1:6379/0 OPENAI_API_KEY=... \\
        uvicorn examples.fastapi_app:app --workers 4

``OPENAI_BASE_URL`` points the client elsewhere (the tests use the local demo server).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import openai
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend, StreamingResponseCache

REDIS_URL = os.environ.get("CHENGETA_REDIS_URL")
PREFIX = os.environ.get("CHENGETA_PREFIX", "chengeta:")

client = openai.AsyncOpenAI()
if REDIS_URL:  # many processes: one upstream call per prompt across all of them
    from chengeta_ai import RedisBackend, RedisFlights

    manager = CacheManager(
        backend=RedisBackend(REDIS_URL, prefix=PREFIX), key_builder=CacheKeyBuilder()
    )
    stream_cache = StreamingResponseCache(manager, flights=RedisFlights(REDIS_URL, prefix=PREFIX))
else:  # one process
    manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
    stream_cache = StreamingResponseCache(manager)
app = FastAPI()


class Ask(BaseModel):
    prompt: str
    model: str = "gpt-4o-mini"


@app.post("/chat")
async def chat(ask: Ask) -> StreamingResponse:
    messages = [{"role": "user", "content": ask.prompt}]

    def stream_fn(msgs: Any) -> Any:
        return client.chat.completions.create(model=ask.model, messages=msgs, stream=True)

    async def events() -> AsyncIterator[str]:
        # aclosing: a client that disconnects leaves the shared stream at once
        async with aclosing(
            stream_cache.aget_or_stream(messages, stream_fn, model_id=ask.model)
        ) as chunks:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={
            "cache-control": "no-cache",
            "x-accel-buffering": "no",  # no proxy buffering (nginx)
            "x-worker-pid": str(os.getpid()),
        },
    )


@app.get("/stats")
async def stats() -> dict[str, Any]:
    """This process's cache counters (hits, misses, joins, stores, ...)."""
    return stream_cache.stats()


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}
