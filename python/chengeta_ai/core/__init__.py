"""Cache management: `CacheManager` (fail-open rules, framing) and `CacheKeyBuilder`."""
