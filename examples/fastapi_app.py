"""FastAPI recipe: one upstream call per prompt across every worker of `uvicorn --workers N`.

Every worker process builds the same cache: a `RedisBackend` for stored streams and a
`RedisFlights` for in-flight ones, both on one Redis. Identical requests that arrive while a
stream runs, in any worker, share its one upstream call; later ones are replayed from the cache.

    CHENGETA_REDIS_URL=redis://127.0.0.1:6379/0 OPENAI_API_KEY=... \\
        uvicorn examples.fastapi_app:app --workers 4

``OPENAI_BASE_URL`` points the client elsewhere (the tests use the local demo server).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import openai
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from chengeta_ai import (
    CacheKeyBuilder,
    CacheManager,
    RedisBackend,
    RedisFlights,
    StreamingResponseCache,
)

REDIS_URL = os.environ.get("CHENGETA_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("CHENGETA_PREFIX", "chengeta:")

client = openai.AsyncOpenAI()
manager = CacheManager(
    backend=RedisBackend(REDIS_URL, prefix=PREFIX), key_builder=CacheKeyBuilder()
)
stream_cache = StreamingResponseCache(manager, flights=RedisFlights(REDIS_URL, prefix=PREFIX))
app = FastAPI()


class Ask(BaseModel):
    prompt: str
    model: str = "gpt-4o-mini"


@app.post("/chat")
async def chat(ask: Ask) -> StreamingResponse:
    messages = [{"role": "user", "content": ask.prompt}]

    def stream_fn(msgs: Any) -> Any:
        return client.chat.completions.create(model=ask.model, messages=msgs, stream=True)

    async def text() -> AsyncIterator[str]:
        async for chunk in stream_cache.aget_or_stream(messages, stream_fn, model_id=ask.model):
            if chunk.choices:
                yield chunk.choices[0].delta.content or ""

    return StreamingResponse(
        text(), media_type="text/plain", headers={"x-worker-pid": str(os.getpid())}
    )


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}
