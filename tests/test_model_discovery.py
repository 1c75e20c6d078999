"""`register_model` discovers nested classes reached only at run time (on the writing side);
unregistered classes are reported once per class per process, with the call that fixes it."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel
from tests import litellm_shapes
from tests.clients.fidelity import assert_identical

from chengeta_ai import CacheManager, SQLiteBackend, register_model
from chengeta_ai._core import registered_models
from chengeta_ai.layers.streaming_cache import StreamingResponseCache


def test_one_call_registers_a_litellm_stream_and_its_runtime_classes() -> None:
    names = set(registered_models())
    assert "tests.litellm_shapes.Delta" not in names  # not reachable through annotations
    register_model(litellm_shapes.ModelResponseStream)  # the one call a user makes
    cache = StreamingResponseCache(CacheManager())
    chunks = litellm_shapes.stream()
    miss = list(cache.get_or_stream(["hi"], lambda _: iter(chunks), model_id="litellm"))
    hit = list(cache.get_or_stream(["hi"], lambda _: iter(chunks), model_id="litellm"))
    stats = cache.stats()
    assert (stats["stores"], stats["hits"], stats["not_stored_unserializable"]) == (1, 1, 0)
    assert_identical(hit, miss)
    assert type(hit[-1].choices[0].delta) is litellm_shapes.Delta
    assert type(hit[-1].__pydantic_extra__["usage"]) is litellm_shapes.Usage
    assert (
        type(hit[-2].choices[0].delta.tool_calls[0]) is litellm_shapes.ChatCompletionDeltaToolCall
    )
    found = set(registered_models())
    for cls in ("Delta", "Usage", "ChatCompletionDeltaToolCall", "Function"):
        assert f"tests.litellm_shapes.{cls}" in found


def test_a_top_level_unregistered_class_is_never_registered_behind_your_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unlisted(BaseModel):
        text: str

    cache = StreamingResponseCache(CacheManager())
    name = f"{Unlisted.__module__}.{Unlisted.__qualname__}"
    with caplog.at_level(logging.DEBUG, logger="chengeta_ai"):
        for i in range(3):
            out = list(cache.get_or_stream([f"q{i}"], lambda _: iter([Unlisted(text="a")])))
            assert out == [Unlisted(text="a")]  # the caller's stream is whole
    assert name not in registered_models()
    assert cache.stats()["not_stored_unserializable"] == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert name in message and "chengeta_ai.register_model(" in message
    assert "logged once per class" in message
    # every later miss is still logged, at debug level
    assert sum("will not be cached" in r.getMessage() for r in caplog.records) == 3


def test_a_reader_that_never_registered_the_class_logs_once_with_the_fix(
    tmp_path: Path,
) -> None:
    """A real second process reads entries naming a class it never registered."""
    db = tmp_path / "entries.db"

    class ForeignChunk(BaseModel):
        text: str

    ForeignChunk.__qualname__ = "ForeignChunk"
    ForeignChunk.__module__ = "tests.test_model_discovery_foreign"
    register_model(ForeignChunk)
    writer = CacheManager(SQLiteBackend(db))
    for key in ("chengeta:object:a", "chengeta:object:b"):
        assert writer.set(key, [ForeignChunk(text="x")])
    writer.close()
    child = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(
            stream=sys.stdout, level=logging.DEBUG, format="%(levelname)s %(message)s"
        )
        from chengeta_ai import CacheManager, SQLiteBackend
        manager = CacheManager(SQLiteBackend({str(db)!r}))
        print("GOT", manager.get("chengeta:object:a"), manager.get("chengeta:object:b"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "GOT None None" in out
    lines = out.splitlines()
    fixes = [line for line in lines if line.startswith("WARNING") and "register_model(" in line]
    assert len(fixes) == 1, out
    assert "tests.test_model_discovery_foreign.ForeignChunk" in fixes[0]
    assert not [line for line in lines if line.startswith("WARNING") and line not in fixes]
