"""chengeta_ai: cache for streamed LLM responses."""
