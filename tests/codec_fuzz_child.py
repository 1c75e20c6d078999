"""The codec fuzz target, run by `tests/test_codec_fuzz.py` in a child process whose address
space is capped (``python -m tests.codec_fuzz_child <memory cap> <examples>``): a crash or an
abort there fails the test instead of killing the test run.

Every input must decode or raise `DecodeError`, within `SLOW` seconds: random bytes, random
bytes behind a valid header, mutations of valid encodings (bit flips, cuts, inserted bytes,
counts and lengths overwritten with huge varints) and zstd frames declaring or producing huge
bodies.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict
from tests import codec_bombs as bombs

from chengeta_ai import _core
from chengeta_ai.errors import DecodeError
from chengeta_ai.models import register_known_models
from chengeta_ai.serializers import CompactSerializer
from chengeta_ai.testing import openai_chunks

SLOW = 1.0  # seconds; a bomb that got through takes far longer


class Extra(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int = 0
    b: str | None = None


class Tree(BaseModel):
    label: str
    children: list[Tree] = []


def stream(items: list[Any], **kw: Any) -> bytes:
    enc = _core.StreamEncoder(**kw)
    for item in items:
        enc.push(item)
    return enc.finish()


def valid_encodings() -> list[bytes]:
    register_known_models()
    _core.register_model(Extra, "tests.fuzz.Extra")
    _core.register_model(Tree, "tests.fuzz.Tree")
    return [
        stream(openai_chunks(30), compress_min_bytes=10**9),
        stream(openai_chunks(30), compress_min_bytes=0),
        _core.encode(
            {"a": [1, 2.5, "x\ud800", b"y", (None, True)], "b": 2**100}, compress_min_bytes=10**9
        ),
        stream([Extra(a=1, q=2), Tree(label="t", children=[Tree(label="u")])] * 3),
        stream([[None] * 50, {"k": ("v", 1)}], compress_min_bytes=0),
    ]


SER = CompactSerializer()


def check(data: bytes) -> None:
    """Decodes ``data`` every way a reader does; only `DecodeError` may come out, quickly."""
    t0 = time.perf_counter()
    for cap in (None, 4096):
        try:
            for _ in SER.iter_batches(data, 7, max_decoded_bytes=cap):
                pass
        except DecodeError:
            pass
        try:
            SER.loads(data, max_decoded_bytes=cap)
        except DecodeError:
            pass
    took = time.perf_counter() - t0
    assert took < SLOW, (took, data[:64])


mutation = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "varint"]),
    st.integers(min_value=0, max_value=2**16),
    st.integers(min_value=0, max_value=255),
    st.sampled_from([2**7, 2**14, 2**21, 2**28, 2**35, 2**62, 2**64 - 1]),
)


def mutate(buf: bytearray, op: str, pos: int, byte: int, big: int) -> None:
    pos %= len(buf) + 1
    if op == "flip" and pos < len(buf):
        buf[pos] ^= 1 << (byte % 8)
    elif op == "truncate":
        del buf[pos:]
    elif op == "insert":
        buf[pos:pos] = bytes([byte])
    elif op == "delete" and pos < len(buf):
        del buf[pos]
    elif op == "varint":  # inflate whatever count or length starts here
        buf[pos : pos + 1] = bombs.varint(max(0, big - byte))


def run(examples: int) -> None:
    valid = valid_encodings()
    for data in valid:
        check(data)
    common = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @common
    @given(
        st.binary(max_size=400),
        st.sampled_from([b"", b"CGCB\x01", b"CGCB\x01\x01", b"CGCB\x01\x03"]),
    )
    def random_bytes(data: bytes, prefix: bytes) -> None:
        check(prefix + data)

    @common
    @given(st.sampled_from(valid), st.lists(mutation, min_size=1, max_size=4))
    def mutations(data: bytes, ops: list[tuple[str, int, int, int]]) -> None:
        buf = bytearray(data)
        for op in ops:
            mutate(buf, *op)
        check(bytes(buf))

    @common
    @given(
        st.integers(min_value=0, max_value=2**40),
        st.integers(min_value=0, max_value=2**30),
        st.integers(min_value=0, max_value=2**30),
        st.sampled_from([0, 1, 2**20, 2**28]),
        st.sampled_from([bombs.FLAG_ZSTD, bombs.FLAG_ZSTD | bombs.FLAG_SEQUENCE]),
        st.binary(max_size=8),
    )
    def zstd_frames(
        declared: int, fill: int, structure_len: int, count: int, flags: int, tail: bytes
    ) -> None:
        # bodies of up to 1 GiB of zeros (None tags) in <= 32 KB, with lying headers
        prefix = bombs.varint(structure_len) + bombs.varint(0) + tail
        frame = bombs.zstd_rle_frame(prefix, fill)
        for body_len in (declared, len(prefix) + fill):
            check(bombs.header(count=count, body_len=body_len, flags=flags) + frame)

    random_bytes()
    mutations()
    zstd_frames()


def main() -> None:
    cap, examples = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    run(examples)
    print("ok")


if __name__ == "__main__":
    main()
