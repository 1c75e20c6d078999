"""Cached SDK clients: ``cached(client, cache)`` (see `chengeta_ai.clients.sdk_clients`).

Modules: `request_key` (what a call's key is made of), `recorded` (the SDK-like streams and
their ``.response``, a real HTTP ``Response`` rebuilt from the recorded head), `calls` (one call
through the cache, sync or async), `assemble` (a whole reply from its streamed twin),
`sdk_clients` (the OpenAI and Anthropic surfaces).
"""

from __future__ import annotations

from typing import Any

from chengeta_ai.clients.recorded import (
    AsyncCachedStream,
    CachedStream,
    cache_info_of,
)
from chengeta_ai.clients.sdk_clients import CachedAnthropic, CachedOpenAI
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

__all__ = [
    "AsyncCachedStream",
    "CachedAnthropic",
    "CachedOpenAI",
    "CachedStream",
    "cache_info_of",
    "cached",
]


def cached(client: Any, cache: StreamingResponseCache, *, isolate_api_keys: bool = True) -> Any:
    """The client with its model calls cached in ``cache``.

    ``client``: an ``openai.OpenAI``, ``openai.AsyncOpenAI`` (or a subclass, e.g.
    ``AzureOpenAI``), ``anthropic.Anthropic`` or ``anthropic.AsyncAnthropic``. The key of each
    call is the whole request (`chengeta_ai.clients.request_key`); ``isolate_api_keys=False``
    leaves the API key out of it, for a cache deliberately shared between keys.

    Raises ``TypeError`` for any other client.
    """
    if _is_instance(client, "openai", ("OpenAI", "AsyncOpenAI")):
        return CachedOpenAI(client, cache, isolate_api_keys=isolate_api_keys)
    if _is_instance(client, "anthropic", ("Anthropic", "AsyncAnthropic")):
        return CachedAnthropic(client, cache, isolate_api_keys=isolate_api_keys)
    raise TypeError(
        "cached() takes an openai.OpenAI, openai.AsyncOpenAI, anthropic.Anthropic or "
        f"anthropic.AsyncAnthropic client, got {type(client).__name__}"
    )


def _is_instance(client: Any, package: str, names: tuple[str, ...]) -> bool:
    """isinstance against an SDK's client classes, without importing an SDK not yet loaded."""
    import sys

    sdk = sys.modules.get(package)
    if sdk is None:
        return False
    classes = tuple(getattr(sdk, name) for name in names if hasattr(sdk, name))
    return isinstance(client, classes)
