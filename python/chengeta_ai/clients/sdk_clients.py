"""The cached clients: the SDK client's own surface, with the calls that produce model output
going through a `StreamingResponseCache`.

- OpenAI (``OpenAI`` / ``AsyncOpenAI``, and their subclasses such as ``AzureOpenAI``):
  ``chat.completions.create``, ``responses.create``, ``completions.create`` (with and without
  ``stream=True``), and the helpers ``chat.completions.stream(...)``, ``responses.stream(...)``;
- Anthropic (``Anthropic`` / ``AsyncAnthropic``): ``messages.create`` (with and without
  ``stream=True``) and the helper ``messages.stream(...)``.

Everything else is the wrapped client's, untouched (``cached(client, cache).models.list()``,
``.with_raw_response``, ``.parse(...)``, ``responses.retrieve(...)``: not cached).
``with_options(...)`` and ``copy(...)`` return cached clients over the new SDK client.

The helpers are the SDK's own: its ``stream(...)`` method is called with a stand-in for the
resource whose ``create`` is the cached one (Anthropic's ``messages.stream`` posts directly:
its stand-in turns the post back into the equivalent ``create``), so the helper objects are the
SDK's ``ChatCompletionStream``, ``ResponseStream``, ``MessageStream`` (and async twins) built
over the cached raw events: ``get_final_completion()``, ``get_final_response()``,
``text_stream``, ``get_final_message()``, ``until_done()`` work on a miss, a join and a hit. A
helper call and the equivalent ``create(stream=True)`` share one entry.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

from chengeta_ai.clients.calls import ClientCache, pop_cache_control
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

__all__ = ["CachedAnthropic", "CachedOpenAI"]


class _Passthrough:
    """Attributes not defined here are the wrapped object's."""

    _wrapped: Any

    def __getattr__(self, name: str) -> Any:
        if name == "_wrapped":  # not set yet (during __init__, or unpickling)
            raise AttributeError(name)
        return getattr(self._wrapped, name)


class CachedResource(_Passthrough):
    """An SDK resource whose ``create`` goes through the cache."""

    endpoint: ClassVar[str]
    #: Whether the API has a ``cache_control`` parameter of its own (see `pop_cache_control`).
    sdk_cache_control: ClassVar[bool] = False

    def __init__(self, resource: Any, core: ClientCache) -> None:
        self._wrapped = resource
        self._core = core

    def create(self, **kwargs: Any) -> Any:
        """The SDK's ``create`` through the cache (a coroutine for an async client). Takes a
        ``cache_control=`` of chengeta_ai's own (never sent upstream)."""
        control = pop_cache_control(kwargs, sdk_has_param=self.sdk_cache_control)
        return self._core.call(self.endpoint, self._wrapped, kwargs, control)

    def _helper(self, kwargs: dict[str, Any]) -> _HelperResource:
        control = pop_cache_control(kwargs, sdk_has_param=self.sdk_cache_control)
        return _HelperResource(self, control)

    def __repr__(self) -> str:
        return f"<cached {self._wrapped!r}>"


class _HelperResource(_Passthrough):
    """What the SDK's ``stream(...)`` helper is given as its resource: ``create`` is the cached
    one (with the call's ``cache_control``), everything else the SDK resource's."""

    def __init__(self, owner: CachedResource, control: Any) -> None:
        self._owner = owner
        self._wrapped = owner._wrapped
        self._control = control

    def create(self, **kwargs: Any) -> Any:
        owner = self._owner
        return owner._core.call(owner.endpoint, owner._wrapped, kwargs, self._control)

    def _post(self, path: str, *, body: Any, options: Any, **_: Any) -> Any:
        """Anthropic's ``messages.stream`` posts directly: the same request as a ``create``."""
        kwargs: dict[str, Any] = dict(body)
        for option, argument in (
            ("headers", "extra_headers"),
            ("params", "extra_query"),
            ("extra_json", "extra_body"),
            ("timeout", "timeout"),
        ):
            if option in options:
                kwargs[argument] = options[option]
        return self.create(**kwargs)


class CachedChatCompletions(CachedResource):
    endpoint = "openai.chat.completions"

    def stream(self, **kwargs: Any) -> Any:
        """The SDK's ``chat.completions.stream(...)`` helper over the cached raw chunks."""
        helper = self._helper(kwargs)
        return type(self._wrapped).stream(helper, **kwargs)


class CachedChat(_Passthrough):
    def __init__(self, chat: Any, core: ClientCache) -> None:
        self._wrapped = chat
        self._core = core

    @cached_property
    def completions(self) -> CachedChatCompletions:
        return CachedChatCompletions(self._wrapped.completions, self._core)


class CachedResponses(CachedResource):
    endpoint = "openai.responses"

    def stream(self, **kwargs: Any) -> Any:
        """The SDK's ``responses.stream(...)`` helper over the cached raw events (streaming an
        existing response by ``response_id`` is the SDK's, uncached)."""
        helper = self._helper(kwargs)
        return type(self._wrapped).stream(helper, **kwargs)


class CachedCompletions(CachedResource):
    endpoint = "openai.completions"


class CachedMessages(CachedResource):
    endpoint = "anthropic.messages"
    sdk_cache_control = True

    def stream(self, **kwargs: Any) -> Any:
        """The SDK's ``messages.stream(...)`` helper over the cached raw events."""
        helper = self._helper(kwargs)
        return type(self._wrapped).stream(helper, **kwargs)


class _CachedClient(_Passthrough):
    def __init__(
        self, client: Any, cache: StreamingResponseCache, *, isolate_api_keys: bool = True
    ) -> None:
        self._wrapped = client
        self._core = ClientCache(
            client,
            cache,
            isolate_api_keys=isolate_api_keys,
            is_async=self._is_async(client),
        )

    @staticmethod
    def _is_async(client: Any) -> bool:
        raise NotImplementedError

    @property
    def wrapped(self) -> Any:
        """The SDK client this one wraps."""
        return self._wrapped

    @property
    def cache(self) -> StreamingResponseCache:
        return self._core.cache

    def with_options(self, **options: Any) -> Any:
        """The SDK's ``with_options``, cached with the same cache."""
        return type(self)(
            self._wrapped.with_options(**options),
            self._core.cache,
            isolate_api_keys=self._core.isolate_api_keys,
        )

    def copy(self, **options: Any) -> Any:
        """The SDK's ``copy``, cached with the same cache."""
        return type(self)(
            self._wrapped.copy(**options),
            self._core.cache,
            isolate_api_keys=self._core.isolate_api_keys,
        )

    def __repr__(self) -> str:
        return f"<cached {self._wrapped!r}>"


class CachedOpenAI(_CachedClient):
    """An ``openai.OpenAI`` or ``openai.AsyncOpenAI`` with cached model calls."""

    @staticmethod
    def _is_async(client: Any) -> bool:
        import openai

        return isinstance(client, openai.AsyncOpenAI)

    @cached_property
    def chat(self) -> CachedChat:
        return CachedChat(self._wrapped.chat, self._core)

    @cached_property
    def responses(self) -> CachedResponses:
        return CachedResponses(self._wrapped.responses, self._core)

    @cached_property
    def completions(self) -> CachedCompletions:
        return CachedCompletions(self._wrapped.completions, self._core)


class CachedAnthropic(_CachedClient):
    """An ``anthropic.Anthropic`` or ``anthropic.AsyncAnthropic`` with cached model calls."""

    @staticmethod
    def _is_async(client: Any) -> bool:
        import anthropic

        return isinstance(client, anthropic.AsyncAnthropic)

    @cached_property
    def messages(self) -> CachedMessages:
        return CachedMessages(self._wrapped.messages, self._core)
