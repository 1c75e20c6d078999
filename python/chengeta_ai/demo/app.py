"""The local upstream as an ASGI application (Starlette): routes, pacing, failure injection.

`build_app` returns the Starlette app that `chengeta_ai.demo.server.LocalOpenAIServer` serves
with uvicorn. The wire formats live in `chengeta_ai.demo.apis`; this module decides when each
event goes out (pacing), counts requests and injects failures:

- pacing: the response headers go out at once (the SDKs return the stream object then, as with
  the real APIs); events that announce the reply (``response.created``, ...) go at once, the
  first model event follows after ``first_token_delay`` seconds and each further token after
  ``token_interval`` seconds; bookkeeping events (``content_block_start``, ``ping``, the
  ``*.done`` events, ...) follow the event before them at once (`chengeta_ai.demo.apis.Frame`);
  a non-streamed reply comes after the time the whole stream would take;
- failure injection, per request with headers (or for every request with the server's
  ``fail_after`` / ``fail_mode`` attributes; headers win)::

      x-chengeta-fail-after: 5     # fail after 5 SSE events (0: before the first); the
                                   # number of events: in place of the terminal event; more:
                                   # no failure
      x-chengeta-fail-mode: close  # "close" (default): drop the connection mid-body, without
                                   # the chunked terminator, so the client sees a protocol error;
                                   # "error": the API's own error event(s), then the body ends:
                                   # OpenAI `data: {"error": ...}`, Responses `event: error` +
                                   # `event: response.failed`, Anthropic `event: error`;
                                   # "end": the body ends cleanly with no terminal event (no
                                   # [DONE], no response.completed, no message_stop)

  Events are counted as the server writes them: chunks for the chat and legacy APIs, every
  event (``response.created``, ``ping``, ...) for Responses and Messages; the terminal event
  (``[DONE]``, ``response.completed``, ``message_stop``) is never counted. A non-streamed
  request with a failure set fails as a whole: "close" drops the connection half way through
  the JSON body, "error" and "end" answer HTTP 500 with the API's error body.

Dropping a connection: ASGI has no "abort" message, so the body iterator raises
`InjectedAbort`; uvicorn then closes the transport without the chunked terminator (after the
bytes already written) and logs the exception, which the filter `hide_injected_aborts` installs
on uvicorn's logger drops (only that exception: every other error is still logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple, Protocol

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chengeta_ai.demo import apis
from chengeta_ai.demo.apis import FAIL_AFTER_HEADER, FAIL_MODE_HEADER, Endpoint, FailMode

__all__ = [
    "InjectedAbort",
    "Settings",
    "build_app",
    "hide_injected_aborts",
]

SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"
MAX_CHOICES = 8


class Settings(Protocol):
    """What the app reads from its server at the start of each request."""

    first_token_delay: float
    token_interval: float
    tokens: int
    fail_after: int | None
    fail_mode: FailMode
    models: list[str]
    anthropic_models: list[str]


class InjectedAbort(Exception):
    """Raised by a body iterator to drop its connection (fail mode "close", or the server
    stopping while a reply is in flight)."""


class _HideInjectedAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_abort(record.exc_info[1]))


def _is_abort(exc: BaseException | None) -> bool:
    if isinstance(exc, InjectedAbort):
        return True
    group = getattr(exc, "exceptions", None)  # an exception group (3.10: the backport)
    return isinstance(group, tuple) and bool(group) and all(_is_abort(e) for e in group)


def hide_injected_aborts() -> None:
    """Install (once) the filter that keeps `InjectedAbort` out of uvicorn's error log."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideInjectedAborts) for f in logger.filters):
        logger.addFilter(_HideInjectedAborts())


class _Failure(NamedTuple):
    after: int | None
    mode: FailMode


class _Api(NamedTuple):
    """One generation endpoint: what it requires and how it answers."""

    endpoint: Endpoint
    prompt_field: str  # the part of the body the reply's seed is taken from
    default_model: str
    anthropic: bool  # error bodies and request-id header in Anthropic's shape
    script: Callable[..., apis.Script]
    body: Callable[..., dict[str, Any]]
    choices: bool  # accepts ``n``


_CHAT = _Api(
    endpoint="chat_completions",
    prompt_field="messages",
    default_model="gpt-4o-mini",
    anthropic=False,
    script=apis.chat_script,
    body=apis.chat_completion,
    choices=True,
)
_LEGACY = _Api(
    endpoint="completions",
    prompt_field="prompt",
    default_model="gpt-3.5-turbo-instruct",
    anthropic=False,
    script=apis.completion_script,
    body=apis.completion,
    choices=True,
)
_RESPONSES = _Api(
    endpoint="responses",
    prompt_field="input",
    default_model="gpt-4o-mini",
    anthropic=False,
    script=apis.responses_script,
    body=apis.response_body,
    choices=False,
)
_MESSAGES = _Api(
    endpoint="messages",
    prompt_field="messages",
    default_model="claude-sonnet-4-6",
    anthropic=True,
    script=apis.anthropic_script,
    body=apis.anthropic_message,
    choices=False,
)


class _App:
    """The request handlers, bound to the server's settings and stop event."""

    def __init__(
        self,
        settings: Settings,
        record: Callable[[Endpoint, dict[str, Any] | None], None],
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.record = record
        self.stopping = stopping

    # -- helpers --------------------------------------------------------------------------

    async def pause(self, seconds: float) -> None:
        """Sleep (a checkpoint even for 0); a stopping server drops the reply in flight."""
        if seconds > 0:
            with anyio.move_on_after(seconds):
                await self.stopping.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if self.stopping.is_set():
            raise InjectedAbort("the server is stopping")

    def failure_for(self, headers: Mapping[str, str]) -> _Failure:
        after, mode = self.settings.fail_after, self.settings.fail_mode
        raw_after = headers.get(FAIL_AFTER_HEADER)
        if raw_after is not None:
            after = int(raw_after)  # ValueError: answered 400 by the caller
        raw_mode = headers.get(FAIL_MODE_HEADER)
        if raw_mode is not None:
            word = raw_mode.strip().lower()
            mode = "error" if word == "error" else "end" if word == "end" else "close"
        return _Failure(after, mode)

    @staticmethod
    def error(api: _Api | None, status: int, message: str, code: str | None = None) -> Response:
        if api is not None and api.anthropic:
            kind = "not_found_error" if status == 404 else "invalid_request_error"
            if status >= 500:
                kind = "api_error"
            return JSONResponse(apis.anthropic_error_body(message, kind), status_code=status)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return JSONResponse(apis.openai_error_body(message, kind, code), status_code=status)

    async def play(self, script: apis.Script, failure: _Failure) -> AsyncIterator[bytes]:
        """The body of a streamed reply: the script's events, paced, then the terminal event
        or the injected failure."""
        events = script.events
        stop = len(events) if failure.after is None else max(0, min(failure.after, len(events)))
        first = True
        for frame in events[:stop]:
            if frame.paced:
                await self.pause(
                    self.settings.first_token_delay if first else self.settings.token_interval
                )
                first = False
            yield frame.data
        if failure.after is None or failure.after > len(events):
            for frame in script.terminal:
                yield frame.data
            return
        if failure.mode == "error":
            for frame in script.error(stop):
                yield frame.data
        elif failure.mode == "close":
            raise InjectedAbort(f"injected failure after {stop} events")
        # "end": the body ends here, cleanly, with no terminal event

    # -- routes ---------------------------------------------------------------------------

    async def generate(self, request: Request, api: _Api) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return self.error(
                api,
                400,
                f"We could not parse the JSON body of your request. ({exc})",
                "invalid_json",
            )
        if not isinstance(body, dict):
            return self.error(api, 400, "The request body must be a JSON object.")
        field = api.prompt_field
        if field not in body:
            return self.error(api, 400, f"Missing required parameter: '{field}'.")
        if field == "messages" and not (isinstance(body[field], list) and body[field]):
            return self.error(api, 400, "'messages' must be a non-empty array.")
        if api.anthropic and not isinstance(body.get("max_tokens"), int):
            return self.error(api, 400, "max_tokens: Field required")
        n = body.get("n", 1) if api.choices else 1
        if n is None:
            n = 1
        if not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            return self.error(api, 400, f"'n' must be an integer from 1 to {MAX_CHOICES}.")
        try:
            failure = self.failure_for(request.headers)
        except ValueError:
            return self.error(api, 400, f"{FAIL_AFTER_HEADER} must be an integer.")

        self.record(api.endpoint, body)
        s = self.settings
        model = str(body.get("model") or api.default_model)
        seed = apis.seed_for(body[field])
        kwargs: dict[str, Any] = {"tokens": s.tokens, "model": model, "seed": seed}
        if api.choices:
            kwargs["n"] = n
        request_id = f"req_{seed:016x}"
        headers = {"request-id" if api.anthropic else "x-request-id": request_id}
        if body.get("stream"):
            script = api.script(body, **kwargs)
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(
                self.play(script, failure), media_type=SSE_MEDIA_TYPE, headers=headers
            )

        await self.pause(s.first_token_delay + s.token_interval * s.tokens * n)
        if failure.after is not None:
            if failure.mode == "close":
                return StreamingResponse(
                    self.truncated(json.dumps(api.body(body, **kwargs)).encode()),
                    media_type="application/json",
                    headers=headers,
                )
            return self.error(api, 500, apis.INJECTED, "injected_failure")
        return JSONResponse(api.body(body, **kwargs), headers=headers)

    async def truncated(self, data: bytes) -> AsyncIterator[bytes]:
        """Half a JSON body, then the connection drops."""
        yield data[: len(data) // 2]
        raise InjectedAbort("injected failure half way through the body")

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, _CHAT)

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, _LEGACY)

    async def responses(self, request: Request) -> Response:
        return await self.generate(request, _RESPONSES)

    async def messages(self, request: Request) -> Response:
        return await self.generate(request, _MESSAGES)

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: OpenAI's list, or Anthropic's when the client sends
        ``anthropic-version`` (as the ``anthropic`` SDK does)."""
        self.record("models", None)
        if "anthropic-version" in request.headers:
            ids = list(self.settings.anthropic_models)
            data = [
                {
                    "type": "model",
                    "id": m,
                    "display_name": _display_name(m),
                    "created_at": "2025-09-29T00:00:00Z",
                }
                for m in ids
            ]
            return JSONResponse(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": ids[0] if ids else None,
                    "last_id": ids[-1] if ids else None,
                }
            )
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": m,
                        "object": "model",
                        "created": apis.CREATED,
                        "owned_by": "chengeta",
                    }
                    for m in self.settings.models
                ],
            }
        )

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        what = "Unknown path" if status == 404 else "Method not allowed"
        api = _MESSAGES if request.url.path.startswith("/v1/messages") else None
        return self.error(api, status, f"{what}: {request.method} {request.url.path}", "not_found")


def _display_name(model: str) -> str:
    """``claude-sonnet-4-6`` -> ``Claude Sonnet 4.6``."""
    words: list[str] = []
    version: list[str] = []
    for part in model.split("-"):
        (version if part.isdigit() else words).append(part)
    return " ".join([w.title() for w in words] + ([".".join(version)] if version else []))


def build_app(
    settings: Settings,
    record: Callable[[Endpoint, dict[str, Any] | None], None],
    stopping: asyncio.Event,
) -> Starlette:
    """The ASGI app: ``record(endpoint, body)`` is called once per request that reaches a
    route with a valid body; replies in flight are dropped once ``stopping`` is set."""
    app = _App(settings, record, stopping)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", app.chat_completions, methods=["POST"]),
            Route("/v1/completions", app.completions, methods=["POST"]),
            Route("/v1/responses", app.responses, methods=["POST"]),
            Route("/v1/messages", app.messages, methods=["POST"]),
            Route("/v1/models", app.models, methods=["GET"]),
        ],
        exception_handlers={404: app.not_found, 405: app.not_found},
    )
