"""A hit from an in-process backend opens a stored ``bytes`` object once: the frame's checksum
(`unframe_entry(remember=True)`) and the decompressed, validated body with its strings
(`StreamDecoder(remember=True)`) are remembered by the object's identity. These tests hold the
memos to what a fresh open would do: equal chunks field for field, a damaged or planted copy
refused, the decode cap applied on every open, and the memos bounded."""

from __future__ import annotations

import copy
import pickle
import threading
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from chengeta_ai import CacheKeyBuilder, CacheManager, InMemoryBackend, _core, register_model
from chengeta_ai.core import cache_manager
from chengeta_ai.core.cache_manager import frame, unframe_entry
from chengeta_ai.errors import DecodeError
from chengeta_ai.layers.streaming_cache import StreamingResponseCache
from chengeta_ai.models import register_known_models
from chengeta_ai.testing import openai_chunks

register_known_models()


def assert_identical(got: list[Any], want: list[Any]) -> None:
    """Equal field for field: type, ``==``, fields set, extras, private, JSON dump."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w) and g == w
        if isinstance(w, BaseModel):
            assert g.model_fields_set == w.model_fields_set
            assert g.model_extra == w.model_extra
            assert g.__pydantic_private__ == w.__pydantic_private__
            assert g.model_dump_json() == w.model_dump_json()
            assert getattr(g, "obfuscation", None) == getattr(w, "obfuscation", None)
            for name in type(w).model_fields:
                value = getattr(w, name)
                if isinstance(value, list):
                    assert_identical(getattr(g, name), value)
                elif isinstance(value, BaseModel):
                    assert_identical([getattr(g, name)], [value])


def encoded(n: int = 300, seed: int = 1) -> tuple[list[Any], bytes]:
    items = openai_chunks(n, seed=seed)
    enc = _core.StreamEncoder()
    for item in items:
        enc.push(item)
    return items, enc.finish()


def decode_all(data: bytes, **kw: Any) -> list[Any]:
    dec = _core.StreamDecoder(data, **kw)
    out: list[Any] = []
    while batch := dec.take(64):
        out.extend(batch)
    return out


def test_a_payload_decodes_where_it_lies() -> None:
    items, data = encoded()
    framed = b"\x00" * 37 + data
    assert_identical(decode_all(framed, offset=37), items)
    assert_identical(decode_all(bytearray(framed), offset=37), items)
    with pytest.raises(ValueError, match="beyond"):
        _core.StreamDecoder(framed, offset=len(framed) + 1)
    with pytest.raises(DecodeError):  # the header is not where the offset says
        _core.StreamDecoder(framed, offset=36)


def test_remembered_bodies_replay_identical_chunks_every_time() -> None:
    items, data = encoded()
    # the first decoder opens and remembers, the second reuses the body, the third (after a
    # replay read to the end) also reuses its strings
    for _ in range(4):
        assert_identical(decode_all(data, remember=True), items)
    a, b = decode_all(data, remember=True), decode_all(data, remember=True)
    assert a[5] is not b[5] and a[5].choices is not b[5].choices
    assert a[5].model_fields_set is not b[5].model_fields_set
    assert a[5].model_extra is not b[5].model_extra


def test_chunks_of_a_remembered_body_are_independent_and_behave_as_constructed() -> None:
    items, data = encoded(50)
    decode_all(data, remember=True)
    a, b = decode_all(data, remember=True), decode_all(data, remember=True)
    a[3].id = "changed"
    a[3].choices[0].delta.content = "edited"
    assert "id" in a[3].model_fields_set
    assert b[3] == items[3] and b[3].choices[0].delta.content == items[3].choices[0].delta.content
    assert_identical([copy.deepcopy(b[4])], [items[4]])
    assert_identical([pickle.loads(pickle.dumps(b[4]))], [items[4]])
    assert_identical([b[4].model_copy()], [items[4]])
    assert vars(b[4]) == vars(items[4])


class WithNew(BaseModel):
    """A model with a ``__new__`` of its own: decoding must call it, as ``model_construct``."""

    made: ClassVar[list[int]] = []
    x: int = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> WithNew:
        WithNew.made.append(1)
        return super().__new__(cls)


def test_a_class_with_its_own_new_is_still_made_through_it() -> None:
    register_model(WithNew, "tests.opened_memo.WithNew")
    value = [WithNew(x=1), WithNew(x=2)]
    data = _core.encode(value)
    before = len(WithNew.made)
    out = _core.decode(data)
    assert out == value and len(WithNew.made) == before + 2


def outcome(data: bytes, **kw: Any) -> list[Any] | str:
    try:
        return decode_all(data, **kw)
    except DecodeError as exc:
        return f"DecodeError: {exc}"


def test_a_damaged_copy_of_a_remembered_body_is_opened_on_its_own() -> None:
    """The codec carries no checksum (the entry frame does): a damaged copy either fails to
    decode or decodes to what its own bytes say, exactly as without the memo, never to the
    remembered body's chunks."""
    items, data = encoded()
    assert_identical(decode_all(data, remember=True), items)
    refused = 0
    for i in range(20, len(data), max(1, len(data) // 40)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        fresh = outcome(bytes(damaged))
        got = outcome(bytes(damaged), remember=True)
        if isinstance(fresh, str):
            refused += 1
            assert got == fresh
        else:
            assert not isinstance(got, str)
            assert_identical(got, fresh)
    assert refused > 5
    # the same bytes in another object are opened on their own (and decode alike)
    assert_identical(decode_all(bytes(bytearray(data)), remember=True), items)


def test_the_decode_cap_applies_to_a_remembered_body() -> None:
    items, data = encoded()
    assert_identical(decode_all(data, remember=True), items)
    with pytest.raises(DecodeError, match="exceeds the decoding limit"):
        _core.StreamDecoder(data, remember=True, max_decoded_bytes=1000)
    assert_identical(decode_all(data, remember=True), items)


def test_a_registration_makes_remembered_bodies_validate_again() -> None:
    items, data = encoded()
    assert_identical(decode_all(data, remember=True), items)

    class Later(BaseModel):
        y: int = 0

    register_model(Later, "tests.opened_memo.Later")
    assert_identical(decode_all(data, remember=True), items)


def test_threads_share_a_remembered_body() -> None:
    items, data = encoded(400, seed=7)
    results: list[list[Any]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def run() -> None:
        try:
            start.wait()
            for _ in range(5):
                results.append(decode_all(data, remember=True))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 40
    for out in results:
        assert_identical(out, items)


def test_many_remembered_bodies_stay_bounded_and_correct() -> None:
    first_items, first = encoded(200, seed=11)
    decode_all(first, remember=True)
    values = [[f"v{i}-{j}" for j in range(700)] for i in range(300)]  # more than the memo holds
    datas = [_core.encode(v, compress_min_bytes=2**40) for v in values]
    assert all(len(d) > 4096 for d in datas)
    for _ in range(2):
        for value, data in zip(values, datas, strict=True):
            assert decode_all(data, remember=True) == [value]
    assert_identical(decode_all(first, remember=True), first_items)  # forgotten: opened again


def test_unframe_entry_remembers_a_checked_object_and_refuses_a_damaged_copy() -> None:
    payload = bytes(range(256)) * 40
    raw = frame(payload, written_at=1000.0, timing=b"")
    entry = unframe_entry(raw, remember=True)
    assert unframe_entry(raw, remember=True) is entry
    assert bytes(raw[entry.start :]) == payload == bytes(entry.payload)
    assert unframe_entry(raw) is not entry  # not asked to remember: checked again
    damaged = bytearray(raw)
    damaged[-1] ^= 1
    with pytest.raises(DecodeError, match="checksum"):
        unframe_entry(bytes(damaged), remember=True)
    small = frame(b"tiny")
    assert unframe_entry(small, remember=True) is not unframe_entry(small, remember=True)


def test_unframe_memo_is_bounded() -> None:
    raws = [frame(i.to_bytes(4, "little") * 2000) for i in range(cache_manager._UNFRAMED_MAX + 50)]
    for raw in raws:
        unframe_entry(raw, remember=True)
    assert len(cache_manager._UNFRAMED) <= cache_manager._UNFRAMED_MAX
    assert cache_manager._unframed_bytes == sum(len(r) for r, _ in cache_manager._UNFRAMED.values())
    assert cache_manager._unframed_bytes <= cache_manager._UNFRAMED_BYTES


def new_cache() -> tuple[StreamingResponseCache, InMemoryBackend]:
    backend = InMemoryBackend()
    return StreamingResponseCache(CacheManager(backend, CacheKeyBuilder())), backend


def test_memory_backend_hits_replay_identical_chunks() -> None:
    items = openai_chunks(700, seed=3)
    cache, _ = new_cache()
    messages = [{"role": "user", "content": "memo"}]
    calls = []

    def upstream(m: Any) -> Any:
        calls.append(m)
        yield from items

    assert_identical(list(cache.get_or_stream(messages, upstream)), items)
    for _ in range(4):
        assert_identical(list(cache.get_or_stream(messages, upstream)), items)
    assert len(calls) == 1 and cache.stats()["hits"] == 4


@pytest.mark.parametrize("where", ["frame", "payload"])
def test_a_planted_entry_under_a_remembered_key_is_a_miss(where: str) -> None:
    items = openai_chunks(700, seed=4)
    cache, backend = new_cache()
    messages = [{"role": "user", "content": "planted"}]
    calls = []

    def upstream(m: Any) -> Any:
        calls.append(m)
        yield from items

    list(cache.get_or_stream(messages, upstream))
    list(cache.get_or_stream(messages, upstream))  # a hit: the object is remembered
    (key,) = [k for k in backend._entries]
    raw = backend.get(key)
    assert raw is not None
    entry = unframe_entry(raw)
    if where == "frame":  # damaged in storage: the checksum no longer matches
        bad = bytearray(raw)
        bad[entry.start + 40] ^= 0x20
        planted = bytes(bad)
    else:  # a well-framed entry whose payload is not a valid encoding
        for i in range(20, len(entry.payload)):
            payload = bytearray(entry.payload)
            payload[i] ^= 0x20
            if isinstance(outcome(bytes(payload)), str):
                break
        planted = frame(bytes(payload), written_at=entry.written_at)
    backend.set(key, planted)
    assert_identical(list(cache.get_or_stream(messages, upstream)), items)
    assert len(calls) == 2 and cache.stats()["corrupt_entries"] == 1


def test_a_bytearray_is_never_remembered_by_identity() -> None:
    items, data = encoded()
    buf = bytearray(data)
    assert_identical(decode_all(buf, remember=True), items)
    buf[len(buf) // 2 :] = bytes(len(buf) - len(buf) // 2)  # changed in place, same object
    with pytest.raises(DecodeError):
        decode_all(buf, remember=True)
