"""chengeta_ai: cache streamed LLM responses, replay hits as streams, share in-flight streams.

Imports are lazy: ``import chengeta_ai`` loads nothing heavy until a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CacheControl",
    "CacheInfo",
    "CacheKeyBuilder",
    "CacheManager",
    "CacheMiss",
    "CacheStats",
    "ChengetaError",
    "CompactSerializer",
    "ConsumerLagged",
    "DecodeError",
    "EncodeError",
    "InMemoryBackend",
    "JsonSerializer",
    "ManagerStats",
    "PickleSerializer",
    "RedisBackend",
    "RedisFlights",
    "SQLiteBackend",
    "StreamingResponseCache",
    "UpstreamLost",
    "__version__",
    "cache_info_of",
    "cached",
    "register_model",
]

_WHERE = {
    "CacheControl": "chengeta_ai.layers.call_controls",
    "CacheInfo": "chengeta_ai.layers.call_controls",
    "CacheMiss": "chengeta_ai.errors",
    "CacheStats": "chengeta_ai.core.stats",
    "ManagerStats": "chengeta_ai.core.stats",
    "CacheManager": "chengeta_ai.core.cache_manager",
    "CacheKeyBuilder": "chengeta_ai.core.key_builder",
    "InMemoryBackend": "chengeta_ai.backends.memory_backend",
    "SQLiteBackend": "chengeta_ai.backends.sqlite_backend",
    "RedisBackend": "chengeta_ai.backends.redis_backend",
    "StreamingResponseCache": "chengeta_ai.layers.streaming_cache",
    "CompactSerializer": "chengeta_ai.serializers",
    "PickleSerializer": "chengeta_ai.serializers",
    "JsonSerializer": "chengeta_ai.serializers",
    "register_model": "chengeta_ai.models",
    "cached": "chengeta_ai.clients",
    "cache_info_of": "chengeta_ai.clients",
    "BackendError": "chengeta_ai.errors",
    "ChengetaError": "chengeta_ai.errors",
    "ConsumerLagged": "chengeta_ai.errors",
    "DecodeError": "chengeta_ai.errors",
    "EncodeError": "chengeta_ai.errors",
    "UpstreamLost": "chengeta_ai.errors",
    "RedisFlights": "chengeta_ai.layers.redis_flights",
}

if TYPE_CHECKING:
    from chengeta_ai.backends.memory_backend import InMemoryBackend
    from chengeta_ai.backends.redis_backend import RedisBackend
    from chengeta_ai.backends.sqlite_backend import SQLiteBackend
    from chengeta_ai.clients import cache_info_of, cached
    from chengeta_ai.core.cache_manager import CacheManager
    from chengeta_ai.core.key_builder import CacheKeyBuilder
    from chengeta_ai.core.stats import CacheStats, ManagerStats
    from chengeta_ai.errors import (
        BackendError,
        CacheMiss,
        ChengetaError,
        ConsumerLagged,
        DecodeError,
        EncodeError,
        UpstreamLost,
    )
    from chengeta_ai.layers.call_controls import CacheControl, CacheInfo
    from chengeta_ai.layers.redis_flights import RedisFlights
    from chengeta_ai.layers.streaming_cache import StreamingResponseCache
    from chengeta_ai.models import register_model
    from chengeta_ai.serializers import CompactSerializer, JsonSerializer, PickleSerializer


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'chengeta_ai' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
