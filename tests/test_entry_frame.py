"""Entry frames v1 and v2 (written_at + recorded timing): round trips, bounds, fuzzing."""

from __future__ import annotations

import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chengeta_ai import _core
from chengeta_ai.core.cache_manager import frame, unframe, unframe_entry
from chengeta_ai.core.key_builder import CacheKeyBuilder
from chengeta_ai.errors import DecodeError


def test_v1_frames_are_unchanged_and_have_no_age_or_timing() -> None:
    data = frame(b"payload")
    assert data[:2] == b"\xc6\x01" and len(data) == 6 + 7
    entry = unframe_entry(data)
    assert bytes(entry.payload) == b"payload"
    assert entry.written_at is None and entry.timing is None and entry.age() is None


def test_v2_frames_carry_written_at_and_timing() -> None:
    log = _core.ChunkLog()
    for i in range(3):
        log.push(i)
    timing = log.timing()
    assert timing is not None
    data = frame(b"payload", written_at=time.time() - 5, timing=timing)
    assert data[:2] == b"\xc6\x02"
    entry = unframe_entry(data)
    assert bytes(entry.payload) == b"payload" and bytes(unframe(data)) == b"payload"
    assert entry.timing is not None and bytes(entry.timing) == timing
    age = entry.age()
    assert age is not None and 4.9 < age < 60
    offsets = _core.decode_timing(bytes(entry.timing), max_total_seconds=10)
    assert len(offsets) == 3 and offsets == sorted(offsets)
    assert unframe_entry(frame(b"x", written_at=1.0)).timing is None


def test_an_old_reader_refuses_a_v2_frame_cleanly() -> None:
    """A reader that knows only v1 checks the magic first: a v2 entry is a clean miss."""
    data = frame(b"payload", written_at=1.0, timing=b"\x0a\x00")

    def old_unframe(raw: bytes) -> bytes:
        if raw[:2] != b"\xc6\x01":
            raise DecodeError("not a chengeta_ai entry (bad magic)")
        return raw[6:]

    with pytest.raises(DecodeError, match="bad magic"):
        old_unframe(data)


def _v2(body: bytes) -> bytes:
    return b"\xc6\x02" + zlib.crc32(body).to_bytes(4, "little") + body


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "varint"),  # no meta length
        (b"\xff\xff", "varint"),  # truncated varint
        (b"\x05\x01", "overruns"),  # meta longer than the entry
        (b"\x01\xff", "varint"),  # written_at truncated inside the meta
        (b"\xff" * 11, "varint"),  # a varint longer than 10 bytes
    ],
)
def test_damaged_v2_headers_are_decode_errors(body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        unframe_entry(_v2(body))


def test_every_truncation_of_a_v2_frame_is_refused() -> None:
    data = frame(b"some payload bytes", written_at=123.0, timing=b"\x0a\x02\x05\x07")
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            unframe_entry(data[:n])


@pytest.mark.parametrize(
    "section",
    [
        b"",
        b"\x00\x00",  # unit 0
        b"\x0a\x05\x01",  # count beyond the bytes
        b"\x0a\x01\x01\x00",  # trailing byte
        b"\x0a\x01" + b"\xff" * 10 + b"\x01",  # varint overflow
        b"\xc1\x84\x3d\x00",  # unit above 1 s
    ],
)
def test_corrupt_timing_sections_are_decode_errors(section: bytes) -> None:
    with pytest.raises(DecodeError):
        _core.decode_timing(section, max_total_seconds=3600)


def test_timing_above_the_cap_is_refused() -> None:
    # unit 1,000,000 us, one chunk at 2 hours
    section = b"\xc0\x84\x3d\x01" + bytes([0xA0, 0x38])  # 7200 = 0x1c20
    with pytest.raises(DecodeError, match="exceeds"):
        _core.decode_timing(section, max_total_seconds=3600)
    assert _core.decode_timing(section, max_total_seconds=7200) == [7200.0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_timing_never_fails_but_with_decode_error(data: bytes) -> None:
    try:
        offsets = _core.decode_timing(data, max_total_seconds=3600)
    except DecodeError:
        return
    assert offsets == sorted(offsets) and len(offsets) <= len(data)
    assert not offsets or offsets[-1] <= 3600


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=48))
def test_unframe_entry_of_any_checksummed_body_is_an_entry_or_a_decode_error(
    body: bytes,
) -> None:
    try:
        entry = unframe_entry(_v2(body))
    except DecodeError:
        return
    assert len(entry.payload) <= len(body)
    assert entry.written_at is not None and entry.written_at >= 0


def test_partitioned_keys_leave_unpartitioned_keys_unchanged() -> None:
    kb = CacheKeyBuilder()
    plain = kb.build([{"role": "user", "content": "x"}], "m")
    assert kb.build([{"role": "user", "content": "x"}], "m", partition=None) == plain
    tenant = kb.build([{"role": "user", "content": "x"}], "m", partition="t1")
    assert tenant.startswith("chengeta:stream:t1:") and tenant[-64:] != plain[-64:]
    assert kb.build([{"role": "user", "content": "x"}], "m", partition="t2") != tenant
    with pytest.raises(ValueError, match="partition"):
        kb.build([], "m", partition="a:b")
    assert kb.digest([], "m", partition="t1").hex() == kb.build([], "m", partition="t1")[-64:]
