"""Cache layers on top of `CacheManager`: `streaming_cache` (and its in-flight `fanout`)."""
