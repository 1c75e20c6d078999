"""Hand-built hostile compact encodings: zstd bombs, inflated counts, planted templates.

Shared by `tests/test_codec_bounds.py` and the fuzz child `tests/codec_fuzz_child.py`. Nothing
here calls the encoder, so the bytes do not depend on what the encoder would refuse to write.
"""

from __future__ import annotations

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK_MAX = 128 * 1024  # zstd's largest block
TAG_NONE, TAG_STR_NEW, TAG_STR_REF, TAG_LIST, TAG_MODEL_DEF, TAG_MODEL = 0, 6, 7, 10, 13, 14
FLAG_SEQUENCE, FLAG_ZSTD = 0x01, 0x02
INST_FIELDS_SET_SAME = 0x01


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def body(structure: bytes, lengths: bytes = b"", data: bytes = b"") -> bytes:
    return varint(len(structure)) + varint(len(lengths)) + structure + lengths + data


def header(*, count: int, body_len: int, flags: int) -> bytes:
    return b"CGCB\x01" + bytes([flags]) + varint(count) + varint(body_len)


def raw_frame(body: bytes, *, count: int = 1, flags: int = 0) -> bytes:
    return header(count=count, body_len=len(body), flags=flags) + body


def _block(block_type: int, size: int, last: bool, content: bytes) -> bytes:
    h = int(last) | (block_type << 1) | (size << 3)
    return h.to_bytes(3, "little") + content


def zstd_rle_frame(prefix: bytes, fill: int, byte: int = 0) -> bytes:
    """A zstd frame expanding to ``prefix`` then ``fill`` copies of ``byte``: 4 bytes per
    128 KiB (RLE blocks), so a few KB expand to hundreds of MB."""
    out = bytearray(ZSTD_MAGIC + b"\x00\x38")  # no content size; 128 KiB window
    blocks: list[tuple[int, int, bytes]] = []
    if prefix:
        blocks.append((0, len(prefix), prefix))  # raw block
    while fill:
        n = min(fill, BLOCK_MAX)
        blocks.append((1, n, bytes([byte])))
        fill -= n
    if not blocks:
        blocks.append((0, 0, b""))
    for i, (kind, size, content) in enumerate(blocks):
        out += _block(kind, size, i == len(blocks) - 1, content)
    return bytes(out)


def none_stream_bomb(n: int = 2**28) -> bytes:
    """A sequence of ``n`` `None` items (one structure byte each) in ~n/32768 bytes: the 8 KB
    entry that used to replay as 268 million chunks."""
    prefix = varint(n) + varint(0)
    return header(count=n, body_len=len(prefix) + n, flags=FLAG_SEQUENCE | FLAG_ZSTD) + (
        zstd_rle_frame(prefix, n)
    )


def list_count_bomb(n: int = 2**29) -> bytes:
    """One list declaring ``n`` items, all present (zeros = `None`) after decompression: the
    16 KB entry whose item vector (8 bytes per declared item) aborted the process."""
    prefix = varint(n + 1 + len(varint(n))) + varint(0) + bytes([TAG_LIST]) + varint(n)
    return header(count=1, body_len=len(prefix) + n, flags=FLAG_ZSTD) + zstd_rle_frame(prefix, n)


def lying_zstd_header(declared: int, actual: int) -> bytes:
    """A frame whose header declares ``declared`` body bytes and that expands to ``actual``."""
    prefix = varint(actual - 2) + varint(0) if actual >= 2 else b""
    fill = max(0, actual - len(prefix))
    return header(count=1, body_len=declared, flags=FLAG_ZSTD) + zstd_rle_frame(prefix, fill)


def fields_set_reuse_bomb(class_name: str, names: int, instances: int) -> bytes:
    """A model template whose first instance has ``names`` extra fields-set names; every later
    instance (3 bytes) says "same fields set as before": decoding would be quadratic."""
    name = class_name.encode()
    structure = bytearray([TAG_MODEL_DEF, TAG_STR_NEW]) + varint(0)  # class name, 0 fields
    structure += bytes([0])  # flags; no same-field mask, no fields-set mask (0 fields)
    structure += varint(names)
    lengths = bytearray(varint(len(name)))
    data = bytearray(name)
    for i in range(names):
        word = f"f{i}".encode()
        structure.append(TAG_STR_NEW)
        lengths += varint(len(word))
        data += word
    for _ in range(instances):
        structure += bytes([TAG_MODEL, 0, INST_FIELDS_SET_SAME])
    return raw_frame(
        body(bytes(structure), bytes(lengths), bytes(data)), count=1 + instances, flags=1
    )


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the offset after it."""
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def split_raw(data: bytes) -> tuple[int, int, bytes]:
    """(flags, count, body) of an uncompressed encoding."""
    flags = data[5]
    count, pos = read_varint(data, 6)
    body_len, pos = read_varint(data, pos)
    assert not flags & FLAG_ZSTD and len(data) - pos == body_len
    return flags, count, data[pos:]
