"""The compact codec (`chengeta_ai._core` encode/decode/StreamEncoder/StreamDecoder)."""

from __future__ import annotations

import enum
import gc
import math
import struct
import sys
import threading
from collections import OrderedDict
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, PrivateAttr

from chengeta_ai import _core
from chengeta_ai.errors import DecodeError, EncodeError
from chengeta_ai.models import register_known_models, register_model
from chengeta_ai.testing import openai_chunks

register_known_models()


# --------------------------------------------------------------------------- helpers


def same(a: Any, b: Any) -> bool:
    """Deep equality that also checks exact types and float bits (nan, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, BaseModel):
        return (
            a.__pydantic_fields_set__ == b.__pydantic_fields_set__
            and same(a.__dict__, b.__dict__)
            and same(a.__pydantic_extra__, b.__pydantic_extra__)
            and same(a.__pydantic_private__, b.__pydantic_private__)
        )
    return bool(a == b)


def stream(items: list[Any], **kw: Any) -> bytes:
    enc = _core.StreamEncoder(**kw)
    for item in items:
        enc.push(item)
    return enc.finish()


class Extra(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int = 0
    b: str | None = None


class WithPrivate(BaseModel):
    x: int = 1
    _secret: str = PrivateAttr(default="s")


class Tree(BaseModel):
    label: str
    children: list[Tree] = []


class Node(BaseModel):
    """A model whose first field can hold instances of its own class, scalars after it."""

    kids: list[Node] = []
    name: str = ""
    n: int = 0


class Counted(BaseModel):
    made: ClassVar[int] = 0
    i: int

    def __new__(cls, *args: Any, **kwargs: Any) -> Counted:
        Counted.made += 1
        return super().__new__(cls)


class Unregistered(BaseModel):
    x: int = 0


for _cls in (Extra, WithPrivate, Tree, Node, Counted):
    register_model(_cls)


# --------------------------------------------------------------------------- round trips

SCALARS = [
    None,
    True,
    False,
    0,
    1,
    -1,
    127,
    128,
    -(2**63),
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**200 + 12345,
    -(3**150),
    0.0,
    -0.0,
    1.5,
    math.inf,
    -math.inf,
    math.nan,
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0],  # nan with payload
    "",
    "hello",
    "ünïcødé 🎉",
    "x" * 10_000,
    "lone \ud800 surrogate",
    b"",
    b"\x00\xff" * 100,
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
@pytest.mark.parametrize("compress_min_bytes", [0, 2048])
def test_scalar_round_trip(value: Any, compress_min_bytes: int) -> None:
    out = _core.decode(_core.encode(value, compress_min_bytes=compress_min_bytes))
    assert same(out, value)


def test_containers_keep_types_and_order() -> None:
    value = {
        "z": [1, (2, 3), {"k": (True, False, None)}],
        1: "int key",
        (1, "t"): b"tuple key",
        None: 1.0,
        False: [],
        b"k": (),
        "nested": {"b": 1, "a": 2},
    }
    out = _core.decode(_core.encode(value))
    assert same(out, value)
    assert list(out) == list(value)
    assert type(out["z"][1]) is tuple
    assert out[False] == [] and type(list(out)[4]) is bool


def test_repeated_strings_are_interned() -> None:
    one = len(_core.encode(["a fairly long repeated string"], compress_min_bytes=10**9))
    many = len(_core.encode(["a fairly long repeated string"] * 100, compress_min_bytes=10**9))
    assert many < one + 100 * 3
    out = _core.decode(_core.encode(["s", "s", "t", "s"]))
    assert out == ["s", "s", "t", "s"]


def test_openai_stream_round_trip_is_exact() -> None:
    chunks = openai_chunks(300, include_usage=True)
    for kw in ({}, {"compress_min_bytes": 10**9}, {"compress_min_bytes": 0, "level": 19}):
        data = stream(chunks, **kw)
        dec = _core.StreamDecoder(data)
        assert dec.is_sequence and dec.count == len(chunks)
        out = list(dec)
        assert out == chunks
        for a, b in zip(chunks, out, strict=True):
            assert type(a) is type(b)
            assert same(a, b)
            assert a.obfuscation == b.obfuscation  # type: ignore[attr-defined]
            assert a.model_dump(exclude_unset=True) == b.model_dump(exclude_unset=True)
            assert a.to_dict() == b.to_dict()
            assert a.model_dump_json() == b.model_dump_json()
        assert out[1].choices[0].delta.content == chunks[1].choices[0].delta.content
        assert out[-1].usage is not None and out[-1].usage == chunks[-1].usage


def test_decoded_models_do_not_share_mutable_state() -> None:
    chunks = openai_chunks(5)
    out = _core.decode(stream(chunks))
    out[2].choices[0].delta.content = "changed"
    assert out[3].choices[0].delta.content == chunks[3].choices[0].delta.content
    assert out[2].__pydantic_fields_set__ is not out[3].__pydantic_fields_set__
    assert out[2].__dict__ is not out[3].__dict__


def test_decoded_chunks_are_light_on_the_collector() -> None:
    # Fields sets hold field names only (no cycles): they are not GC-tracked, the models, their
    # dicts holding containers and the lists are. Fewer tracked objects than the SDK's parse.
    chunks = openai_chunks(50)
    out = _core.decode(stream(chunks))
    for c in out:
        assert not gc.is_tracked(c.__pydantic_fields_set__)
        assert not gc.is_tracked(c.choices[0].__pydantic_fields_set__)
        assert not gc.is_tracked(c.choices[0].delta.__pydantic_fields_set__)
        assert gc.is_tracked(c) and gc.is_tracked(c.__dict__) and gc.is_tracked(c.choices)
    # still an ordinary, mutable fields set, tracked by pydantic as usual
    out[3].choices[0].delta.refusal = "no"
    assert "refusal" in out[3].choices[0].delta.model_fields_set
    assert "refusal" not in out[4].choices[0].delta.model_fields_set
    assert out[4] == chunks[4] and out[3] != chunks[3]
    # the fewest over a few tries: another thread (a worker left by an earlier test of the
    # suite) may create a tracked object in between (seen: 6.02 once in a full run)
    per_chunk = []
    for _ in range(3):
        gc.collect()
        before = len(gc.get_objects())
        kept = _core.decode(stream(chunks))
        per_chunk.append((len(gc.get_objects()) - before - 1) / len(kept))
        del kept
    assert min(per_chunk) <= 6


def test_extras_private_and_fields_set() -> None:
    items: list[Any] = [
        Extra(a=1, zz=1, yy="two"),
        Extra(a=1, yy="two", zz=1),  # same extras, other order
        Extra.model_construct(b="only b"),
        Extra.model_construct(_fields_set={"a", "ghost"}, a=5),
        Extra(),
        WithPrivate(x=3),
        WithPrivate.model_construct(),
    ]
    items[5]._secret = "changed"
    items.append(Tree(label="root", children=[Tree(label="a"), Tree(label="b", children=[])]))
    items.append(Tree.model_construct(label="partial"))
    for data in (stream(items), _core.encode(items)):
        out = _core.decode(data)
        for a, b in zip(items, out, strict=True):
            assert type(a) is type(b) and a == b and same(a, b)
            assert list((a.__pydantic_extra__ or {}).items()) == list(
                (b.__pydantic_extra__ or {}).items()
            )
    assert out[5]._secret == "changed"


def test_same_class_nested_fields_set_edge_case() -> None:
    # Parent and child of one class with different fields_set/values: the "same as previous"
    # state must be tracked in the same order on both sides.
    inner = Tree.model_construct(label="child")
    outer = Tree(label="parent", children=[inner, Tree(label="parent")])
    items = [outer, Tree(label="child"), outer, outer]  # the last one: FS_SAME + children
    out = _core.decode(stream(items))
    assert all(same(a, b) for a, b in zip(items, out, strict=True))


def test_fields_that_change_then_repeat_decode_exactly() -> None:
    # The decoder leaves a field that changed out of its template's base dict (most change on
    # every instance) and brings it back when the value repeats: every pattern of change and
    # repeat, alone and with same-template instances nested in between.
    a_values = [1, 2, 2, 3, 3, 3, 4, 5, 5, 6, 6]
    b_values = ["x", "y", "y", None, None, "z", "z", "z", "w", "w", "v"]
    items: list[Any] = [Extra(a=a, b=b) for a, b in zip(a_values, b_values, strict=True)]
    trees: list[Any] = []
    for i, label in enumerate(["p", "q", "q", "r", "r", "r", "s", "s"]):
        inner = [Tree(label=str(i)), Tree(label=label)] if i % 3 else []
        trees.append(Tree(label=label, children=inner))
        trees.append(Tree(label=label))
    for seq in (items, trees, [x for pair in zip(items, trees, strict=False) for x in pair]):
        for data in (stream(seq), _core.encode(seq)):
            out = _core.decode(data)
            assert len(out) == len(seq) and all(same(x, y) for x, y in zip(seq, out, strict=True))
    # decoded in small batches too (the decoder's per-template state carries across takes)
    dec = _core.StreamDecoder(stream(trees))
    out = []
    while got := dec.take(3):
        out.extend(got)
    assert all(same(x, y) for x, y in zip(trees, out, strict=True))


def test_fields_after_a_nested_instance_of_the_same_template() -> None:
    # The encoder decides "same as previous" for every field in one walk, before the values
    # are written; a same-template instance nested in an earlier field changes "previous" for
    # the fields after it, which are then decided again (as the decoder reads them).
    items = [
        Node(name="a", n=1),
        Node(kids=[Node(name="b", n=2)], name="a", n=1),
        Node(kids=[Node(name="a", n=1), Node(name="c")], name="a", n=2),
        Node(kids=[Node(kids=[Node(name="a")], name="d", n=2)], name="d", n=2),
        Node(name="d", n=2),
    ]
    for data in (stream(items), _core.encode(items)):
        out = _core.decode(data)
        assert all(same(x, y) for x, y in zip(items, out, strict=True))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from([None, "a", "b"])),
        max_size=40,
    )
)
def test_hypothesis_repeating_fields_round_trip(pairs: list[tuple[int, str | None]]) -> None:
    # Few distinct values: long runs of "same as previous" with changes in between.
    items = [Extra(a=a, b=b) if a != 2 else Extra.model_construct(b=b) for a, b in pairs]
    out = _core.decode(stream(items))
    assert len(out) == len(items) and all(same(x, y) for x, y in zip(items, out, strict=True))


def test_fields_set_members_that_are_str_subclasses_are_stored_as_their_string() -> None:
    # The encoder compares a fields set with the previous instance's before looking at its
    # members; either way a str subclass member is stored as its string value, and anything
    # else in a fields set is an EncodeError.
    class Name(str):
        pass

    first = Extra(a=1)
    first.__pydantic_fields_set__ = {Name("a")}
    second = Extra(a=2)
    second.__pydantic_fields_set__ = {Name("a")}
    items = [first, second, Extra(a=3), first]
    out = _core.decode(stream(items))
    assert out == items
    for a, b in zip(items, out, strict=True):
        assert b.model_fields_set == a.model_fields_set == {"a"}
        assert all(type(m) is str for m in b.model_fields_set)
        assert a.model_dump_json(exclude_unset=True) == b.model_dump_json(exclude_unset=True)
    bad = Extra(a=1)
    bad.__pydantic_fields_set__ = {"a", 3}  # type: ignore[assignment]
    with pytest.raises(EncodeError, match="holds a non-str"):
        stream([Extra(a=1), bad])


def test_an_entry_this_process_wrote_is_trusted_but_a_forged_copy_is_validated() -> None:
    # StreamEncoder.finish remembers its own output as valid (the validation memo, keyed by
    # BLAKE3 of the exact bytes): a copy differing in any byte is still walked whole up front.
    class Marked(BaseModel):
        v: int = 0

    _core.register_model(Marked, "yyyyyyyyyyyyyyyy")
    data = stream([Marked(v=i) for i in range(3000)], compress_min_bytes=10**9)
    assert len(data) >= 4096 and data.count(b"yyyyyyyyyyyyyyyy") == 1
    assert [m.v for m in _core.decode(data)] == list(range(3000))
    forged = data.replace(b"yyyyyyyyyyyyyyyy", b"tests.NotThere!_")
    with pytest.raises(DecodeError, match="unknown model class name"):
        _core.StreamDecoder(forged)  # before any item is taken


# --------------------------------------------------------------------------- hypothesis

keys = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.floats(allow_nan=False),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["id", "model", "chat.completion.chunk", ""]),
    st.binary(max_size=40),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, max_size=6).map(tuple),
        st.dictionaries(keys, inner, max_size=6),
        st.builds(Extra, a=st.integers(), b=st.none() | st.text(max_size=5)),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.sampled_from([0, 64, 2048]))
def test_hypothesis_round_trip(value: Any, compress_min_bytes: int) -> None:
    out = _core.decode(_core.encode(value, compress_min_bytes=compress_min_bytes))
    assert same(out, value)


@settings(max_examples=150, deadline=None)
@given(st.lists(values, max_size=12), st.integers(min_value=1, max_value=5))
def test_hypothesis_stream_round_trip(items: list[Any], batch: int) -> None:
    dec = _core.StreamDecoder(stream(items, compress_min_bytes=128))
    out: list[Any] = []
    while got := dec.take(batch):
        out.extend(got)
    assert dec.remaining == 0
    assert len(out) == len(items) and all(same(a, b) for a, b in zip(items, out, strict=True))


def _decode_all(data: bytes) -> None:
    try:
        dec = _core.StreamDecoder(data)
        while dec.take(7):
            pass
    except DecodeError:
        pass
    try:
        _core.decode(data)
    except DecodeError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_decode_error(data: bytes) -> None:
    _decode_all(data)
    _decode_all(b"CGCB\x01" + data)
    _decode_all(b"CGCB\x01\x01" + data)


VALID = [
    stream(openai_chunks(40), compress_min_bytes=10**9),
    stream(openai_chunks(40), compress_min_bytes=0),
    _core.encode({"a": [1, 2.5, "x", b"y", (None, True)], "b": 2**100}, compress_min_bytes=10**9),
    stream([Extra(a=1, q=2), Tree(label="t", children=[Tree(label="u")])] * 3),
]


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "insert", "delete"]),
            st.integers(min_value=0),
            st.integers(min_value=0, max_value=255),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_fuzz_mutations_only_decode_error(
    data: bytes, mutations: list[tuple[str, int, int]]
) -> None:
    buf = bytearray(data)
    for op, pos, byte in mutations:
        pos %= len(buf) + 1
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << (byte % 8)
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes([byte])
        elif op == "delete" and pos < len(buf):
            del buf[pos]
        if not buf:
            buf = bytearray(b"C")
    _decode_all(bytes(buf))


# --------------------------------------------------------------------------- format and errors


def test_every_truncation_is_a_decode_error() -> None:
    for data in VALID:
        for cut in range(len(data)):
            with pytest.raises(DecodeError):
                _decode_all_strict(data[:cut])


def _decode_all_strict(data: bytes) -> None:
    dec = _core.StreamDecoder(data)
    while dec.take(100):
        pass


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"\x80\x05\x95", "bad magic"),
        (b"CGCB\x09\x00\x01\x01\x00", "unknown format version 9"),
        (b"CGCB\x01\xf0\x01\x01\x00", "unknown header flags"),
        (b'{"json": 1}', "bad magic"),
    ],
)
def test_foreign_and_unknown_version_messages(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        _core.decode(data)


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def body(structure: bytes, lengths: bytes = b"", data: bytes = b"") -> bytes:
    return varint(len(structure)) + varint(len(lengths)) + structure + lengths + data


def frame(body: bytes, *, count: int = 1, flags: int = 0) -> bytes:
    return b"CGCB\x01" + bytes([flags]) + varint(count) + varint(len(body)) + body


def test_huge_declared_lengths_do_not_allocate() -> None:
    structure = b"\x0a" + varint(2**60)  # a list claiming 2**60 items
    with pytest.raises(DecodeError, match="list length"):
        _core.decode(frame(body(structure)))
    structure = b"\x06"  # a new string claiming 2**40 bytes of data
    with pytest.raises(DecodeError, match="string length"):
        _core.decode(frame(body(structure, varint(2**40), b"abc")))
    # a compressed body claiming 2**62 bytes
    with pytest.raises(DecodeError):
        _core.decode(b"CGCB\x01\x02\x01" + varint(2**62) + b"\x28\xb5\x2f\xfd\x00")
    with pytest.raises(DecodeError, match="structure \\+ lengths"):
        _core.decode(frame(varint(1) + varint(1) + b"\x00"))
    with pytest.raises(DecodeError, match="item count"):
        _core.decode(frame(body(b"\x00"), count=5, flags=1))


def test_deep_nesting_is_bounded() -> None:
    deep: list[Any] = []
    cur = deep
    for _ in range(500):
        cur.append([])
        cur = cur[0]
    with pytest.raises(EncodeError, match="nesting deeper"):
        _core.encode(deep)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodeError, match="nesting deeper"):
        _core.encode(loop)
    structure = b"\x0a\x01" * 1000 + b"\x00"  # 1000 nested one-item lists
    with pytest.raises(DecodeError, match="nesting deeper"):
        _core.decode(frame(body(structure)))


def test_single_value_and_empty_stream() -> None:
    dec = _core.StreamDecoder(_core.encode([1, 2]))
    assert not dec.is_sequence and dec.count == 1
    assert dec.take(5) == [[1, 2]] and dec.take(5) == []
    assert _core.decode(stream([])) == []
    dec = _core.StreamDecoder(stream([]))
    assert dec.is_sequence and dec.count == 0 and list(dec) == []


# --------------------------------------------------------------------------- encode errors


def test_unsupported_type_error_names_type_and_path() -> None:
    chunks = openai_chunks(20)
    delta = chunks[12].choices[0].delta
    object.__setattr__(delta, "__dict__", {**delta.__dict__, "foo": {1, 2}})
    enc = _core.StreamEncoder()
    for chunk in chunks[:12]:
        enc.push(chunk)
    with pytest.raises(
        EncodeError, match=r"^chunk 12 \.choices\[0\]\.delta\.foo: unsupported type 'set'$"
    ):
        enc.push(chunks[12])
    assert enc.count == 12
    with pytest.raises(EncodeError, match="poisoned"):
        enc.push(chunks[13])
    with pytest.raises(EncodeError, match="poisoned"):
        enc.finish()


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    ONE = 1


class MyStr(str):
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, r"^value: unsupported type 'set'$"),
        ({"a": [1, object()]}, r"^value \['a'\]\[1\]: unsupported type 'object'$"),
        (Color.RED, "unsupported type 'Color' \\(a str subclass\\)"),
        (Level.ONE, "unsupported type 'Level' \\(an int subclass\\)"),
        (MyStr("x"), "a str subclass"),
        (OrderedDict(a=1), "a dict subclass"),
        (Unregistered(), r"unregistered model class '[\w.]+\.Unregistered'.*register_model"),
        (Extra(a=1, bad=frozenset()), r"^value \.bad: unsupported type 'frozenset'$"),
    ],
)
def test_encode_errors(value: Any, message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        _core.encode(value)


def test_bool_stays_bool_and_finish_once() -> None:
    out = _core.decode(stream([True, 1, False, 0]))
    assert [type(x) for x in out] == [bool, int, bool, int]
    enc = _core.StreamEncoder()
    enc.push(1)
    assert enc.count == 1 and enc.nbytes > 0
    enc.finish()
    with pytest.raises(EncodeError, match="finished"):
        enc.finish()
    with pytest.raises(EncodeError, match="finished"):
        enc.push(1)
    with pytest.raises(ValueError, match="level"):
        _core.StreamEncoder(level=99)


def test_concurrent_pushes_from_threads() -> None:
    enc = _core.StreamEncoder()
    chunks = openai_chunks(50)

    def worker() -> None:
        for chunk in chunks:
            enc.push(chunk)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = _core.decode(enc.finish())
    assert len(out) == 4 * len(chunks)
    assert sorted(c.obfuscation for c in out) == sorted(c.obfuscation for c in chunks * 4)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- registry


def test_registry_rules() -> None:
    class Local(BaseModel):
        v: int = 0

    _core.register_model(Local, "tests.Local")
    _core.register_model(Local, "tests.Local")  # no-op
    assert _core.registered_models()["tests.Local"] is Local
    with pytest.raises(ValueError, match="already registered"):
        _core.register_model(Extra, "tests.Local")
    with pytest.raises(ValueError, match="already registered"):
        _core.register_model(Local, "tests.Other")
    with pytest.raises(TypeError):
        _core.register_model(dict, "tests.dict")
    with pytest.raises(TypeError):
        _core.register_model(BaseModel, "tests.BaseModel")


def test_unknown_class_name_is_decode_error_and_never_imports() -> None:
    class Victim(BaseModel):
        v: int = 0

    _core.register_model(Victim, "zzzzzzzzzzzzzzzz")
    data = _core.encode(Victim(v=1), compress_min_bytes=10**9)
    assert b"zzzzzzzzzzzzzzzz" in data
    for fake in (b"antigravity.Fake", b"tests.NotThere!"):
        forged = data.replace(b"zzzzzzzzzzzzzzzz", fake.ljust(16, b"_"))
        assert "antigravity" not in sys.modules
        with pytest.raises(DecodeError, match="unknown model class name"):
            _core.decode(forged)
        assert "antigravity" not in sys.modules


# --------------------------------------------------------------------------- laziness and size


def test_take_is_lazy() -> None:
    data = stream([Counted(i=i) for i in range(5000)])
    before = Counted.made
    dec = _core.StreamDecoder(data)
    assert dec.count == 5000 and dec.remaining == 5000
    assert Counted.made == before
    first = dec.take(1)
    assert first[0].i == 0
    assert Counted.made == before + 1 and dec.remaining == 4999
    assert [c.i for c in dec.take(3)] == [1, 2, 3]
    assert Counted.made == before + 4 and dec.remaining == 4996


def test_size_target_openai_stream() -> None:
    chunks = openai_chunks(500)
    per_chunk = len(stream(chunks)) / len(chunks)
    assert per_chunk <= 12, per_chunk
    plain = openai_chunks(500, include_obfuscation=False)
    assert len(stream(plain)) / len(plain) <= 4
