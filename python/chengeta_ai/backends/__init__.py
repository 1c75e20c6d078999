"""Storage backends: in-memory, SQLite, Redis; all implement `base.Backend`."""
