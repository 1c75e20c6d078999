"""Decoding is bounded and validated up front: planted or damaged entries are a quick
`DecodeError` (a miss), never a huge allocation, a long loop or a replay that fails half way."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from pydantic import BaseModel
from tests import codec_bombs as bombs

from chengeta_ai import _core
from chengeta_ai.core.cache_manager import DEFAULT_MAX_ENTRY_BYTES, CacheManager, frame
from chengeta_ai.errors import DecodeError, EncodeError
from chengeta_ai.models import register_known_models
from chengeta_ai.serializers import (
    DEFAULT_MAX_DECODED_BYTES,
    CompactSerializer,
    JsonSerializer,
    PickleSerializer,
    decode_cap,
)
from chengeta_ai.testing import openai_chunks

register_known_models()

MEMORY_CAP = 2**30


def run_capped(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a child Python limited to 1 GiB of address space."""
    prelude = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def registered(cls: Any, name: str) -> Any:
    """Registers ``cls`` under ``name``, or returns the class already registered there: this
    module is imported a second time (as ``tests.test_codec_bounds``) by test_flight_faults."""
    existing = _core.registered_models().get(name)
    if existing is not None:
        return existing
    _core.register_model(cls, name)
    return cls


def stream(items: list[Any], **kw: Any) -> bytes:
    enc = _core.StreamEncoder(**kw)
    for item in items:
        enc.push(item)
    return enc.finish()


# --------------------------------------------------------------------------- bombs


@pytest.mark.parametrize(
    ("builder", "size"),
    [("none_stream_bomb", 9000), ("list_count_bomb", 17000)],
)
def test_bombs_are_quick_decode_errors_under_a_memory_cap(builder: str, size: int) -> None:
    """The 8 KB entry that replayed 268 million `None`s after 12 s, and the 16 KB one that
    aborted the process (a list pre-allocated from its declared count), in a child process
    limited to 1 GiB: each is a `DecodeError` well under a second, for every entry point."""
    assert len(getattr(bombs, builder)()) < size
    result = run_capped(
        f"""
        import time
        from chengeta_ai import _core
        from chengeta_ai.errors import DecodeError
        from chengeta_ai.serializers import CompactSerializer
        from tests import codec_bombs
        data = codec_bombs.{builder}()
        ser = CompactSerializer()
        calls = [
            lambda: _core.decode(data),
            lambda: _core.StreamDecoder(data).take(10),
            lambda: ser.loads(data),
            lambda: next(ser.iter_batches(data)),
        ]
        for call in calls:
            t0 = time.process_time()  # CPU: a loaded machine's waits do not count
            try:
                call()
            except DecodeError as exc:
                assert "exceeds the decoding limit" in str(exc), exc
            else:
                raise SystemExit("decoded")
            took = time.process_time() - t0
            assert took < 0.5, took
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        result.returncode,
        result.stdout[-2000:],
        result.stderr[-2000:],
    )


def test_zstd_frame_is_refused_from_its_header() -> None:
    # declares more than 256x its size + 1 MiB: refused before decompressing
    data = bombs.lying_zstd_header(2**27, 2**27)
    with pytest.raises(DecodeError, match="decompressed body of 134217728 bytes exceeds"):
        _core.decode(data)
    # declares a small body, expands to far more: decompression stops one byte past it
    with pytest.raises(DecodeError, match="expands to 1001\\+ bytes, header says 1000"):
        _core.decode(bombs.lying_zstd_header(1000, 2**26))
    # the caller's cap applies to compressed and raw bodies alike
    valid = _core.encode(list(range(3000)), compress_min_bytes=0)
    assert _core.decode(valid) == list(range(3000))
    with pytest.raises(DecodeError, match="exceeds the decoding limit of 1000 bytes"):
        _core.decode(valid, max_decoded_bytes=1000)
    raw = _core.encode(list(range(3000)), compress_min_bytes=10**9)
    with pytest.raises(DecodeError, match=r"body of .* exceeds the decoding limit of 1000 bytes"):
        _core.StreamDecoder(raw, max_decoded_bytes=1000)


def test_count_bombs_within_the_body_are_refused_without_allocating() -> None:
    n = 2**28
    structure = bytes([bombs.TAG_LIST]) + bombs.varint(n) + b"\x00" * 100
    with pytest.raises(DecodeError, match="list length 268435456"):
        _core.decode(bombs.raw_frame(bombs.body(structure)))
    with pytest.raises(DecodeError, match="item count"):
        _core.StreamDecoder(bombs.raw_frame(bombs.body(b"\x00" * 10), count=n, flags=1))


class Empty(BaseModel):
    pass


Empty = registered(Empty, "tests.bounds.Empty")


def test_quadratic_fields_set_reuse_is_refused() -> None:
    """A template whose fields set (20,000 names) every later 3-byte instance reuses: the old
    decoder built 400 million set entries; now the reuse budget refuses it up front."""
    data = bombs.fields_set_reuse_bomb("tests.bounds.Empty", 20_000, 20_000)
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match="fields sets reused more than the data can justify"):
        _core.StreamDecoder(data)
    assert time.perf_counter() - t0 < 1
    # the same shape at an honest size decodes
    small = _core.decode(bombs.fields_set_reuse_bomb("tests.bounds.Empty", 5, 100))
    assert len(small) == 101 and small[-1].__pydantic_fields_set__ == {f"f{i}" for i in range(5)}


# --------------------------------------------------------------------------- up-front validation


class Late(BaseModel):
    text: str
    n: int = 0


Late = registered(Late, "tests.bounds.LateAAAA")


def late_class_entry() -> bytes:
    """A stream whose only model instance (item 120) names a class this process never
    registered: as if another process had written it."""
    items: list[Any] = [{"i": i, "s": f"chunk {i}"} for i in range(120)]
    items.append(Late(text="late", n=1))
    items += [{"i": i} for i in range(30)]
    data = stream(items, compress_min_bytes=10**9)
    assert data.count(b"tests.bounds.LateAAAA") == 1
    return data.replace(b"tests.bounds.LateAAAA", b"tests.bounds.LateZZZZ")


def test_unregistered_late_class_fails_before_the_first_batch() -> None:
    data = late_class_entry()
    got: list[Any] = []
    with pytest.raises(DecodeError, match="unknown model class name"):
        for batch in CompactSerializer().iter_batches(data, 16):
            got.extend(batch)
    assert got == []
    with pytest.raises(DecodeError, match="unknown model class name"):
        _core.StreamDecoder(data)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # invalid UTF-8 deep inside the data stream
        (b"chunk 117", b"chunk\xff117", "not valid UTF-8"),
        # a trailing byte
        (None, b"\x00", "trailing bytes"),
    ],
)
def test_late_damage_fails_before_the_first_batch(
    old: bytes | None, new: bytes, message: str
) -> None:
    items = [{"i": i, "s": f"chunk {i}"} for i in range(150)]
    data = stream(items, compress_min_bytes=10**9)
    if old is None:
        flags, count, body = bombs.split_raw(data)
        data = bombs.raw_frame(body + new, count=count, flags=flags)
    else:
        data = data.replace(old, new)
    got: list[Any] = []
    with pytest.raises(DecodeError, match=message):
        for batch in CompactSerializer().iter_batches(data, 16):
            got.extend(batch)
    assert got == []


def test_validation_memo_never_lends_a_verdict_to_other_bytes() -> None:
    # A hot entry is walked once per process (memo keyed by BLAKE3 of its bytes); any other
    # bytes, however close, are walked again, and failures are never remembered.
    chunks = openai_chunks(600)
    packed = stream(chunks)
    good = stream(chunks, compress_min_bytes=10**9)
    assert len(packed) >= 4096 and len(good) >= 4096
    for _ in range(3):
        assert _core.decode(packed) == chunks
        assert _core.decode(good) == chunks
    word = chunks[5].choices[0].delta.content.encode()
    bad = good.replace(word, b"\xff" + word[1:], 1)
    assert bad != good and len(bad) == len(good)
    for _ in range(2):
        with pytest.raises(DecodeError, match="not valid UTF-8"):
            _core.StreamDecoder(bad)
    assert _core.decode(good) == chunks


def test_validation_memo_sees_new_registrations() -> None:
    class Later(BaseModel):
        text: str

    items: list[Any] = [{"i": i, "s": f"chunk {i}"} for i in range(300)]
    items.append(Late(text="late"))
    data = stream(items, compress_min_bytes=10**9)
    assert len(data) >= 4096
    data = data.replace(b"tests.bounds.LateAAAA", b"tests.bounds.LateMEMO")
    for _ in range(2):
        with pytest.raises(DecodeError, match="unknown model class name"):
            _core.StreamDecoder(data)
    _core.register_model(Later, "tests.bounds.LateMEMO")
    out = _core.decode(data)
    assert type(out[-1]) is Later and out[-1].text == "late"
    assert _core.decode(data)[:-1] == items[:-1]


def test_surrogate_strings_are_validated() -> None:
    value = "a\ud800b"
    data = _core.encode(value, compress_min_bytes=10**9)
    assert _core.decode(data) == value
    assert b"\xed\xa0\x80" in data
    forged = data.replace(b"\xed\xa0\x80", b"\xed\x00\x80")
    with pytest.raises(DecodeError, match="not valid UTF-8"):
        _core.StreamDecoder(forged)


def test_unhashable_dict_keys_are_refused_up_front() -> None:
    # a dict whose key is a list: only planted data can say so
    structure = bytes([12, 1, bombs.TAG_LIST, 0, 0])  # {[]: None}
    with pytest.raises(DecodeError, match="dict key is a list"):
        _core.StreamDecoder(bombs.raw_frame(bombs.body(structure)))
    structure = bytes([12, 1, 11, 1, 12, 0, 0])  # {({},): None}
    with pytest.raises(DecodeError, match="dict key is a dict"):
        _core.StreamDecoder(bombs.raw_frame(bombs.body(structure)))
    # tuples of scalars stay fine
    assert _core.decode(_core.encode({(1, "a", (None, b"x")): 2})) == {(1, "a", (None, b"x")): 2}


class Frozen(BaseModel, frozen=True):
    x: int


Frozen = registered(Frozen, "tests.bounds.Frozen")


def test_model_dict_keys_are_an_encode_error() -> None:
    with pytest.raises(
        EncodeError, match=r"value \[Frozen\(x=1\)\]: model instance 'Frozen' as a dict key"
    ):
        _core.encode({Frozen(x=1): 1})
    with pytest.raises(EncodeError, match="as a dict key"):
        _core.encode({(1, Frozen(x=1)): 1})


def test_validation_keeps_decoding_lazy_and_exact() -> None:
    chunks = openai_chunks(300)
    data = stream(chunks)
    dec = _core.StreamDecoder(data)
    assert dec.remaining == len(chunks)
    out = [c for batch in CompactSerializer().iter_batches(data, 7) for c in batch]
    assert out == chunks


# --------------------------------------------------------------------------- caps


def test_decode_cap_rule() -> None:
    assert decode_cap(None) == 2**30
    assert decode_cap(1) == 16 * 2**20  # floor
    assert decode_cap(2**20) == 64 * 2**20
    assert decode_cap(2**30) == 2**30  # ceiling
    assert decode_cap(DEFAULT_MAX_ENTRY_BYTES) == DEFAULT_MAX_DECODED_BYTES


@pytest.mark.parametrize("ser", [CompactSerializer(), PickleSerializer(), JsonSerializer()])
def test_every_serializer_honours_max_decoded_bytes(ser: Any) -> None:
    value = [{"i": i, "s": "x" * 20} for i in range(200)]
    data = ser.dumps(value)
    assert ser.loads(data, max_decoded_bytes=None) == value
    assert ser.loads(data, max_decoded_bytes=10**7) == value
    with pytest.raises(DecodeError, match="exceeds the decoding limit"):
        ser.loads(data, max_decoded_bytes=100)
    with pytest.raises(DecodeError, match="exceeds the decoding limit"):
        ser.iter_batches(data, 16, max_decoded_bytes=100)
    sink = ser.stream_encoder()
    for item in value:
        sink.push(item)
    data = sink.finish()
    with pytest.raises(DecodeError, match="exceeds the decoding limit"):
        ser.iter_batches(data, 16, max_decoded_bytes=100)
    assert [x for b in ser.iter_batches(data, 16, max_decoded_bytes=10**7) for x in b] == value


class RecordingSerializer(CompactSerializer):
    def __init__(self) -> None:
        super().__init__()
        self.caps: list[int | None] = []

    def loads(self, data: bytes, *, max_decoded_bytes: int | None = None) -> Any:
        self.caps.append(max_decoded_bytes)
        return super().loads(data, max_decoded_bytes=max_decoded_bytes)


@pytest.mark.parametrize("max_entry_bytes", [None, 1000, DEFAULT_MAX_ENTRY_BYTES])
def test_cache_manager_decodes_with_the_cap_of_its_entry_size(
    max_entry_bytes: int | None,
) -> None:
    ser = RecordingSerializer()
    manager = CacheManager(serializer=ser, max_entry_bytes=max_entry_bytes)
    manager.set("k", [1, 2, 3])
    assert manager.get("k") == [1, 2, 3]
    assert ser.caps == [decode_cap(max_entry_bytes)]
    # a planted bomb under a valid key is a miss, and is dropped
    manager.backend.set("bomb", frame(bombs.none_stream_bomb()))
    assert manager.get("bomb", "miss") == "miss"
    assert manager.get_raw("bomb") is None
