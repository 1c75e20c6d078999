"""Request key hashing: `_core.hash_request` and `CacheKeyBuilder`.

Golden vectors live in tests/data/key_vectors.json. Regenerate them (only together with a
KEY_FORMAT bump) with: .venv/bin/python tests/test_keys.py --regenerate (which also records the
previous format's builder keys under "retired", to prove the bump retired every one of them).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import random
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chengeta_ai._core import hash_request
from chengeta_ai.core.key_builder import KEY_FORMAT, CacheKeyBuilder, build_key

VECTORS = Path(__file__).parent / "data" / "key_vectors.json"

# --- golden vectors ---------------------------------------------------------------------------
#
# Inputs are JSON, with a few tagged objects for what JSON cannot say:
#   {"$bytes": "<hex>"}, {"$bytearray": "<hex>"}, {"$tuple": [...]}, {"$int": "<decimal>"},
#   {"$float": "nan" | "inf" | "-inf" | "-0.0" | "<repr>"}, {"$dict": [[key, value], ...]}
#   (any keys, in the given insertion order), {"$repeat": ["<str>", n]} (str * n),
#   {"$record": ["<class in VECTOR_CLASSES>", {field: value, ...}]} (the class called with
#   those keyword arguments; fields left out take their defaults).


class VectorHumanMessage(pydantic.BaseModel):
    """LangChain's shape: the kind of message is a field with a class default."""

    __module__ = "chengeta_vectors"  # fixed, so that the digest does not depend on how the
    # tests are imported (module names are part of a record's identity)
    content: str
    type: str = "human"


class VectorSystemMessage(pydantic.BaseModel):
    __module__ = "chengeta_vectors"
    content: str
    type: str = "system"


class VectorLoose(pydantic.BaseModel, extra="allow"):
    __module__ = "chengeta_vectors"
    role: str = "user"


class VectorParams(pydantic.BaseModel):
    __module__ = "chengeta_vectors"
    temperature: float = 1.0
    max_tokens: int | None = None


@dataclasses.dataclass
class VectorData:
    role: str
    content: str = ""


VectorData.__module__ = "chengeta_vectors"


class VectorPair(NamedTuple):
    role: str
    content: str


VectorPair.__module__ = "chengeta_vectors"

VECTOR_CLASSES: dict[str, type[Any]] = {
    cls.__qualname__: cls
    for cls in (
        VectorHumanMessage,
        VectorSystemMessage,
        VectorLoose,
        VectorParams,
        VectorData,
        VectorPair,
    )
}


def decode(node: Any) -> Any:
    """A vector's input as the Python object it describes."""
    if isinstance(node, list):
        return [decode(item) for item in node]
    if isinstance(node, dict):
        if len(node) == 1:
            ((tag, arg),) = node.items()
            if tag == "$bytes":
                return bytes.fromhex(arg)
            if tag == "$bytearray":
                return bytearray.fromhex(arg)
            if tag == "$tuple":
                return tuple(decode(item) for item in arg)
            if tag == "$int":
                return int(arg)
            if tag == "$float":
                return float(arg)
            if tag == "$dict":
                return {decode(k): decode(v) for k, v in arg}
            if tag == "$repeat":
                return arg[0] * arg[1]
            if tag == "$record":
                name, fields = arg
                return VECTOR_CLASSES[name](**{k: decode(v) for k, v in fields.items()})
        return {k: decode(v) for k, v in node.items()}
    return node


CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
    ],
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "stream": True,
    "stream_options": {"include_usage": True},
}
CHAT_REORDERED = {
    "stream_options": {"include_usage": True},
    "stream": True,
    "temperature": 0.2,
    "model": "gpt-4o-mini",
    "messages": [
        {"content": "You are terse.", "role": "system"},
        {"content": "Name a prime.", "role": "user"},
    ],
}
TOOLS = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        }
    ],
    "tool_choice": "auto",
    "max_tokens": 256,
    "seed": None,
}

HASH_CASES: list[tuple[str, Any]] = [
    ("none", None),
    ("true", True),
    ("false", False),
    ("int zero", 0),
    ("int one", 1),
    ("int minus one", -1),
    ("int 2**64", {"$int": str(2**64)}),
    ("int -2**200", {"$int": str(-(2**200))}),
    ("float one", 1.0),
    ("float minus zero", {"$float": "-0.0"}),
    ("float nan", {"$float": "nan"}),
    ("float -inf", {"$float": "-inf"}),
    ("float 0.1", 0.1),
    ("str empty", ""),
    ("str one", "1"),
    ("str unicode", "héllo wörld 👋 ☃"),
    ("bytes", {"$bytes": "31ff00"}),
    ("bytearray", {"$bytearray": "31ff00"}),
    ("list empty", []),
    ("tuple", {"$tuple": [1, "a", None]}),
    ("dict empty", {}),
    (
        "dict mixed keys",
        {
            "$dict": [
                [1, "a"],
                ["1", "b"],
                [{"$bytes": "31"}, "c"],
                [{"$tuple": [1, 2]}, None],
                [True, 1.5],
            ]
        },
    ),
    ("chat request", CHAT),
    ("chat request reordered", CHAT_REORDERED),
    ("tools params", TOOLS),
    ("long str", {"$repeat": ["abcdefgh", 5000]}),
    # Around the padding of the last part (format 4): encoded in 1,024 bytes (not padded), in
    # 1,025 and 1,901 (padded to 2,048), in 16,384 (one whole part), in 17,409 (its last part
    # of 1,025 padded to 2,048).
    ("str 1,020", {"$repeat": ["y", 1020]}),
    ("str 1,021", {"$repeat": ["y", 1021]}),
    ("str 1,897", {"$repeat": ["y", 1897]}),
    ("str 16,380", {"$repeat": ["y", 16380]}),
    ("str 17,405", {"$repeat": ["y", 17405]}),
    # Around the one-byte length prefix (lengths up to 247) and its two- and three-byte forms.
    ("str 247", {"$repeat": ["x", 247]}),
    ("str 248", {"$repeat": ["x", 248]}),
    ("str 300", {"$repeat": ["x", 300]}),
    (
        "dict keys around 248",
        {
            "$dict": [
                [{"$repeat": ["b", 248]}, 1],
                [{"$repeat": ["a", 300]}, 2],
                [{"$repeat": ["c", 247]}, 3],
                ["z", 4],
            ]
        },
    ),
    ("nested lists", [[[[[[[[[[1]]]]]]]]]]),
    ("model defaults", {"$record": ["VectorHumanMessage", {"content": "hi"}]}),
    ("model other class", {"$record": ["VectorSystemMessage", {"content": "hi"}]}),
    ("model explicit", {"$record": ["VectorHumanMessage", {"content": "hi", "type": "human"}]}),
    ("model dict", {"content": "hi", "type": "human"}),
    ("model extras", {"$record": ["VectorLoose", {"tag": [1, 2], "role": "tool"}]}),
    ("model nested", [{"$record": ["VectorParams", {"max_tokens": 5}]}, {"k": None}]),
    ("dataclass", {"$record": ["VectorData", {"role": "user"}]}),
    ("named tuple", {"$record": ["VectorPair", {"role": "user", "content": ""}]}),
]

BUILDER_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("defaults", {}, {"messages": CHAT["messages"]}),
    (
        "model and params",
        {},
        {"messages": CHAT["messages"], "model_id": "gpt-4o-mini", "params": {"temperature": 0.2}},
    ),
    ("params none", {}, {"messages": CHAT["messages"], "model_id": "gpt-4o-mini", "params": None}),
    ("namespace", {"namespace": "acme"}, {"messages": CHAT["messages"]}),
    ("version 2", {"version": 2}, {"messages": CHAT["messages"]}),
    ("version str", {"version": "2"}, {"messages": CHAT["messages"]}),
    ("kind default", {"kind": "completion"}, {"messages": CHAT["messages"]}),
    ("kind per call", {}, {"messages": CHAT["messages"], "kind": "completion"}),
    ("tools", {}, {"messages": CHAT["messages"], "model_id": "gpt-4o", "params": TOOLS}),
    (
        "human message model",
        {},
        {"messages": [{"$record": ["VectorHumanMessage", {"content": "Name a prime."}]}]},
    ),
    (
        "system message model",
        {},
        {"messages": [{"$record": ["VectorSystemMessage", {"content": "Name a prime."}]}]},
    ),
    (
        "params model",
        {},
        {"messages": CHAT["messages"], "params": {"$record": ["VectorParams", {}]}},
    ),
]


def builder_key(init: dict[str, Any], call: dict[str, Any]) -> str:
    call = {name: decode(value) for name, value in call.items()}
    return CacheKeyBuilder(**init).build(**call)


def current_vectors() -> dict[str, Any]:
    return {
        "about": (
            "Known-answer vectors for chengeta_ai request keys. A digest changing here means "
            "every stored cache key changes: bump KEY_FORMAT in "
            "python/chengeta_ai/core/key_builder.py, then regenerate with "
            "`.venv/bin/python tests/test_keys.py --regenerate`. Input tags: tests/test_keys.py."
        ),
        "key_format": KEY_FORMAT,
        "hash_request": [
            {"name": name, "input": raw, "digest": hash_request(decode(raw)).hex()}
            for name, raw in HASH_CASES
        ],
        "cache_key_builder": [
            {"name": name, "init": init, "build": call, "key": builder_key(init, call)}
            for name, init, call in BUILDER_CASES
        ],
    }


CHANGED = (
    "{what} changed for vector {name!r}: expected {expected}, got {actual}.\n"
    "This would silently invalidate every user's cache. If the change is intended, bump "
    "KEY_FORMAT in python/chengeta_ai/core/key_builder.py and regenerate the vectors "
    "(.venv/bin/python tests/test_keys.py --regenerate); otherwise fix the regression."
)


def load_vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def regenerated_vectors() -> dict[str, Any]:
    """The vectors file as `--regenerate` writes it: the current vectors, plus the keys of
    every earlier format (`retired`), carried over and extended when KEY_FORMAT moved on."""
    new = current_vectors()
    old = load_vectors() if VECTORS.exists() else {}
    retired: dict[str, dict[str, str]] = dict(old.get("retired", {}))
    if old and old["key_format"] != KEY_FORMAT:
        retired[old["key_format"]] = {v["name"]: v["key"] for v in old["cache_key_builder"]}
    new["retired"] = retired
    return new


def format_number(key_format: str) -> int:
    prefix, _, number = key_format.partition("/")
    assert prefix == "chengeta-key", key_format
    return int(number)


def vector_params(section: str) -> list[dict[str, Any]]:
    # A missing file fails test_vectors_cover_the_declared_cases, not the import.
    return load_vectors()[section] if VECTORS.exists() else []


def test_vectors_cover_the_declared_cases() -> None:
    data = load_vectors()
    assert data["key_format"] == KEY_FORMAT, (
        "KEY_FORMAT changed: regenerate tests/data/key_vectors.json "
        "(.venv/bin/python tests/test_keys.py --regenerate)"
    )
    assert [v["name"] for v in data["hash_request"]] == [name for name, _ in HASH_CASES]
    assert [v["name"] for v in data["cache_key_builder"]] == [name for name, _, _ in BUILDER_CASES]


def test_vectors_file_is_what_the_code_produces() -> None:
    # Byte for byte what `--regenerate` would write now: no vector edited by hand, none stale.
    expected = json.dumps(regenerated_vectors(), indent=1, ensure_ascii=False) + "\n"
    assert VECTORS.read_text() == expected, CHANGED.format(
        what="tests/data/key_vectors.json", name="*", expected="the file", actual="other"
    )


def test_format_bumps_are_deliberate_and_retire_every_old_key() -> None:
    # Each bump is recorded: the keys the earlier format gave for the same builder cases.
    # The current format is newer than every retired one, and shares no key with them: a
    # bump empties every cache exactly once, on purpose.
    data = load_vectors()
    retired = data["retired"]
    assert "chengeta-key/2" in retired
    # One step at a time, each recorded by `--regenerate` (format 3 retired format 2).
    assert format_number(KEY_FORMAT) == 1 + max(format_number(f) for f in retired) >= 3
    current = {v["key"] for v in data["cache_key_builder"]}
    for old_format, old_keys in retired.items():
        assert format_number(old_format) < format_number(KEY_FORMAT)
        assert not current & set(old_keys.values()), old_format
        assert set(old_keys) <= {name for name, _, _ in BUILDER_CASES}


@pytest.mark.parametrize("vector", vector_params("hash_request"), ids=lambda v: v["name"])
def test_hash_request_golden_vectors(vector: dict[str, Any]) -> None:
    actual = hash_request(decode(vector["input"])).hex()
    assert actual == vector["digest"], CHANGED.format(
        what="hash_request", name=vector["name"], expected=vector["digest"], actual=actual
    )


@pytest.mark.parametrize("vector", vector_params("cache_key_builder"), ids=lambda v: v["name"])
def test_cache_key_builder_golden_vectors(vector: dict[str, Any]) -> None:
    actual = builder_key(vector["init"], vector["build"])
    assert actual == vector["key"], CHANGED.format(
        what="CacheKeyBuilder.build", name=vector["name"], expected=vector["key"], actual=actual
    )


def test_vectors_pin_the_documented_equalities_and_differences() -> None:
    digests = {v["name"]: v["digest"] for v in load_vectors()["hash_request"]}
    assert digests["chat request"] == digests["chat request reordered"]
    assert digests["float minus zero"] == hash_request(0.0).hex()
    assert digests["bytes"] == digests["bytearray"]
    assert digests["tuple"] == hash_request([1, "a", None]).hex()
    distinct = ["str one", "true", "int one", "float one", "none", "int zero", "false"]
    assert len({digests[name] for name in distinct}) == len(distinct)
    keys = {v["name"]: v["key"] for v in load_vectors()["cache_key_builder"]}
    assert keys["defaults"].startswith("chengeta:stream:")
    assert keys["kind per call"].startswith("chengeta:completion:")
    assert keys["namespace"].startswith("acme:stream:")
    assert keys["params none"] == builder_key(
        {}, {"messages": CHAT["messages"], "model_id": "gpt-4o-mini", "params": {}}
    )
    # The version only lives in the digest, and "2" and 2 are the same version.
    assert keys["version 2"] == keys["version str"] != keys["defaults"]
    # Records: the class and every field, defaults included.
    assert digests["model defaults"] == digests["model explicit"]
    records = ["model defaults", "model other class", "model dict", "dataclass", "named tuple"]
    assert len({digests[name] for name in records}) == len(records)
    assert keys["human message model"] != keys["system message model"]


# --- hash_request behaviour -------------------------------------------------------------------


def h(obj: object) -> bytes:
    return hash_request(obj)


def test_digest_is_32_bytes() -> None:
    assert isinstance(h({"a": 1}), bytes)
    assert len(h({"a": 1})) == 32


def test_documented_type_rules() -> None:
    class Pair(NamedTuple):
        x: int
        y: str

    assert h([1, "a"]) == h((1, "a")) != h(Pair(1, "a"))  # a named tuple is a record
    assert h(b"ab") == h(bytearray(b"ab"))
    assert len({h("1"), h(True), h(b"1"), h(1), h(1.0), h([1]), h({1: None}), h(None)}) == 8
    assert h(0) != h(False) and h(0) != h(0.0) and h("") != h(b"") != h([]) != h({})
    assert h(-0.0) == h(0.0)
    assert h(float("nan")) == h(-float("nan")) == h(math.inf - math.inf)
    assert h(math.inf) != h(-math.inf)


def test_subclasses_hash_like_their_base() -> None:
    class Role(str, enum.Enum):
        USER = "user"

    class Level(enum.IntEnum):
        HIGH = 3

    class Ratio(float):
        pass

    assert h(Role.USER) == h("user")
    assert h(Level.HIGH) == h(3)
    assert h(Ratio(0.5)) == h(0.5)
    assert h(OrderedDict([("b", 1), ("a", 2)])) == h({"a": 2, "b": 1})


def test_lone_surrogates_hash_without_colliding() -> None:
    assert h("\ud800") != h("\ud801")
    assert h("\ud800") != h("\ud800".encode("utf-8", "surrogatepass").decode("latin-1"))


@dataclasses.dataclass
class DataMessage:
    role: str
    content: str
    name: str | None = None


class ModelMessage(pydantic.BaseModel):
    role: str
    content: str
    name: str | None = None


class LooseModel(pydantic.BaseModel, extra="allow"):
    role: str


class Conversation(pydantic.BaseModel):
    messages: list[ModelMessage]
    temperature: float = 1.0


def test_pydantic_model_hashes_its_class_and_every_field() -> None:
    as_dict = {"role": "user", "content": "hi"}
    msg = ModelMessage(role="user", content="hi")
    assert h(msg) != h(as_dict) and h(msg) != h({**as_dict, "name": None})
    assert h(msg) == h(ModelMessage.model_validate(as_dict)) == h(msg.model_copy())
    # A default left unset and the same value set explicitly send the same request.
    assert h(msg) == h(ModelMessage(role="user", content="hi", name=None))
    assert h(msg) != h(ModelMessage(role="user", content="hi", name="bob"))
    loose = {"role": "user", "tag": [1, 2]}
    assert h(LooseModel.model_validate(loose)) != h(LooseModel.model_validate({"role": "user"}))
    assert h(LooseModel.model_validate(loose)) == h(LooseModel(role="user", tag=(1, 2)))
    convo = Conversation(messages=[msg])
    assert h(convo) == h(Conversation(messages=[msg], temperature=1.0))
    assert h(convo) != h(Conversation(messages=[msg], temperature=0.0))
    assert h(convo) != h(convo.model_dump())


def test_dataclass_hashes_its_class_and_every_field() -> None:
    msg = DataMessage("user", "hi")
    assert h(msg) == h(DataMessage("user", "hi", None)) == h(dataclasses.replace(msg))
    assert h(msg) != h({"role": "user", "content": "hi", "name": None})
    assert h(msg) != h(DataMessage("user", "hi", "bob"))
    with pytest.raises(TypeError, match="'type'"):
        h(DataMessage)  # the class, not an instance


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({1, 2}, "cannot hash object of type 'set' at the top level"),
        ({"messages": [{"content": {1}}]}, "type 'set' at ['messages'][0]['content']"),
        ([0, (1, frozenset())], "type 'frozenset' at [1][1]"),
        ({"a": object()}, "type 'object' at ['a']"),
        ({frozenset(): 1}, "type 'frozenset' at the top level (a dict key)"),
        ([ModelMessage.model_construct(role="u", content=1j)], "type 'complex' at [0].content"),
        ([DataMessage("u", {"x": range(3)})], "type 'range' at [0].content['x']"),  # type: ignore[arg-type]
        (memoryview(b"x"), "type 'memoryview'"),
        ({"k": {"a", "b"}.__iter__()}, "type 'set_iterator' at ['k']"),
    ],
)
def test_unsupported_types_raise_type_error_naming_type_and_place(
    obj: object, message: str
) -> None:
    with pytest.raises(TypeError) as info:
        h(obj)
    assert message in str(info.value)


def test_never_falls_back_to_str_or_repr() -> None:
    class Stringy:
        def __str__(self) -> str:
            return "x"

        __repr__ = __str__

    with pytest.raises(TypeError, match="'Stringy'"):
        h([Stringy()])


def test_dict_with_two_keys_of_one_encoding_is_rejected() -> None:
    @dataclasses.dataclass(frozen=True)
    class A:
        x: int

    @dataclasses.dataclass(frozen=True)
    class B:
        x: int

    assert h({A(1): "a", B(1): "b"}) != h({A(1): "b", B(1): "a"})  # two classes: two keys

    @dataclasses.dataclass(frozen=True, eq=False)
    class ByIdentity:
        x: int

    with pytest.raises(ValueError, match="same canonical encoding"):
        h({ByIdentity(1): "a", ByIdentity(1): "b"})


def test_deep_nesting_and_cycles_are_clean_errors() -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than 256"):
        h(deep)
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="containing itself"):
        h(looped)
    loop_dict: dict[str, Any] = {}
    loop_dict["self"] = loop_dict
    with pytest.raises(ValueError):
        h(loop_dict)
    deepest_ok: Any = 1
    for _ in range(128):
        deepest_ok = {"k": [deepest_ok]}
    h(deepest_ok)  # 256 levels of dict and list: the limit
    with pytest.raises(ValueError, match="nested deeper"):
        h([deepest_ok])


def test_max_depth_fits_a_small_thread_stack() -> None:
    nested: Any = 0
    for i in range(256):
        nested = {"k": nested} if i % 2 else [nested]
    result: list[object] = []
    # Measured: about 700 bytes of C stack per level (dev and release builds), so the deepest
    # accepted request needs under 192 KiB; 256 KiB is the smallest stack this promises.
    old = threading.stack_size(256 * 1024)
    try:
        thread = threading.Thread(target=lambda: result.append(h(nested)))
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old)
    assert result == [h(nested)]


def test_reentrant_hashing_from_model_code() -> None:
    reenter = [False]

    @dataclasses.dataclass
    class Outer:
        a: dict[str, int]
        b: str = "b"

        def __getattribute__(self, name: str) -> Any:
            if name == "a" and reenter[0]:
                assert h({"nested": [1, 2, 3]}) == h({"nested": (1, 2, 3)})  # mid-walk
            return object.__getattribute__(self, name)

    request = [{"x": 1}, Outer({"y": 2}), {"z": Outer({})}]
    expected = h(request)
    reenter[0] = True
    assert h(request) == expected


class Key(str):
    """A str subclass: hashed like str, but its dict keys take the general (encode-and-sort)
    path instead of the in-place str sort."""


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.one_of(
            st.text(max_size=3),
            st.integers(240, 260).map(lambda n: "k" * n),
            st.integers(250, 300).map(lambda n: "é" * n),
        ),
        st.integers(),
        max_size=24,
    )
)
def test_str_key_sort_matches_the_sort_of_encodings(d: dict[str, int]) -> None:
    assert h(d) == h({Key(k): v for k, v in d.items()})
    assert h(list(d.items())) != h(d) or not d


def test_big_str_keyed_dict_order_never_matters() -> None:
    items = [(f"k{i:03d}" * (i % 7 + 1), i) for i in range(300)]
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    assert h(dict(items)) == h(dict(shuffled)) == h({Key(k): v for k, v in shuffled})


def test_containers_changed_during_the_walk() -> None:
    # Model code runs in the middle of the walk; whatever it does to the containers being
    # walked, the walk must neither crash nor read freed objects.
    d: dict[str, Any] = {}
    items: list[Any] = []
    armed = [False]

    @dataclasses.dataclass
    class Meddler:
        x: int = 1

        def __getattribute__(self, name: str) -> Any:
            if name == "x" and armed[0]:
                d.clear()
                items.clear()
                d.update({f"new{i}": object() for i in range(50)})
            return object.__getattribute__(self, name)

    d.update({"a": Meddler(), "b": "x" * 100, "c": [1, 2]})
    expected = h(d)
    armed[0] = True
    assert h(d) == expected  # the entries as they were when the dict was read
    items.extend([Meddler(), 1, 2])
    with pytest.raises(IndexError):
        h(items)  # the list shrank under the walk: as list[1] would


def test_strs_freed_and_reallocated_mid_walk_hash_as_themselves() -> None:
    # Short strs are remembered by address during a walk. Model code that frees one and makes
    # a new str (which CPython's allocator usually puts at the freed address) must not be
    # hashed as the old one. Whether the address is reused depends on the allocator's state:
    # the digests must be right every time, and the reuse must have happened at least once.
    def attempt() -> bool:
        first: dict[str, Any] = {"v": "".join(["a"] * 4)}
        second: dict[str, Any] = {"v": None}
        parts = ["b"] * 4  # made before the free: only the new str is allocated after it
        reused: list[bool] = []

        @dataclasses.dataclass
        class Swapper:
            x: int = 1

            def __getattribute__(self, name: str) -> Any:
                if name == "x" and second["v"] is None:
                    old = id(first["v"])
                    first["v"] = None  # the last reference: freed
                    second["v"] = "".join(parts)  # most likely at the same address
                    reused.append(id(second["v"]) == old)
                return object.__getattribute__(self, name)

        digest = h([first, Swapper(), second])
        assert len(reused) == 1
        second_now = dict(second)
        second["v"] = "taken"  # (disarm)
        assert digest == h([{"v": "aaaa"}, Swapper(), second_now])
        assert digest != h([{"v": "aaaa"}, Swapper(), {"v": "aaaa"}])
        return reused[0]

    reuses = sum(attempt() for _ in range(20))
    assert reuses  # the case this test is about did happen


def test_collector_state_is_left_as_found() -> None:
    # The walk pauses the garbage collector and resumes it: after success, errors, and model
    # code that switches it itself.
    import gc

    @dataclasses.dataclass
    class Switch:
        x: int = 1

        def __getattribute__(self, name: str) -> Any:
            if name == "x":
                gc.disable()
            return object.__getattribute__(self, name)

    assert gc.isenabled()
    try:
        h(CHAT)
        assert gc.isenabled()
        with pytest.raises(TypeError):
            h({"a": [{1, 2}]})
        assert gc.isenabled()
        h([Switch()])
        assert not gc.isenabled()  # what the model code chose
        h(CHAT)
        with pytest.raises(TypeError):
            h({"a": [{1, 2}]})
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_equal_after_error_and_across_threads() -> None:
    with pytest.raises(TypeError):
        h({"a": [{"b": {1}}]})
    expected = h(CHAT)
    results: list[bytes] = []

    def worker() -> None:
        results.extend(h(CHAT) for _ in range(200))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 800


# --- properties -------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(allow_nan=True),
    st.text(),
    st.binary(),
)
hashable_keys = st.one_of(
    st.text(), st.integers(), st.binary(), st.booleans(), st.tuples(st.text(), st.integers())
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(hashable_keys, inner, max_size=5),
    ),
    max_leaves=40,
)


def reorder(obj: Any, rng: random.Random) -> Any:
    """The same value with every dict rebuilt in a shuffled insertion order."""
    if isinstance(obj, dict):
        items = [(k, reorder(v, rng)) for k, v in obj.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(obj, (list, tuple)):
        return type(obj)(reorder(v, rng) for v in obj)
    return obj


def as_lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: as_lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_lists(v) for v in obj]
    return obj


@given(values, st.randoms(use_true_random=False))
def test_dict_insertion_order_never_matters(value: Any, rng: random.Random) -> None:
    assert h(reorder(value, rng)) == h(value)


@given(values)
def test_equal_inputs_hash_equal(value: Any) -> None:
    assert h(copy.deepcopy(value)) == h(value)
    assert h(as_lists(value)) == h(value)


@given(values, values)
def test_different_inputs_hash_differently(a: Any, b: Any) -> None:
    # Equality modulo the documented rules (tuple == list, -0.0 == 0.0, NaN == NaN) means
    # comparing canonical JSON-ish reprs; distinct canonical forms must give distinct hashes.
    def canon(obj: Any) -> Any:
        if isinstance(obj, bool):
            return ("bool", obj)
        if isinstance(obj, int):
            return ("int", obj)
        if isinstance(obj, float):
            return ("float", "nan" if math.isnan(obj) else repr(obj + 0.0))
        if isinstance(obj, (list, tuple)):
            return ("list", [canon(v) for v in obj])
        if isinstance(obj, dict):
            return ("dict", sorted((repr(canon(k)), canon(v)) for k, v in obj.items()))
        return (type(obj).__name__, obj)

    if repr(canon(a)) != repr(canon(b)):
        assert h(a) != h(b)
    else:
        assert h(a) == h(b)


@given(st.integers())
def test_ints_of_any_size_are_exact(n: int) -> None:
    assert h(n) == h(int(str(n)))
    assert h(n) != h(n + 1)
    assert h(n) != h(str(n))
    if -(2**53) < n < 2**53:
        assert h(n) != h(float(n))


@settings(max_examples=50)
@given(st.integers(min_value=2**62, max_value=2**66))
def test_ints_near_the_i64_boundary(n: int) -> None:
    assert len({h(n), h(-n), h(n - 1), h(-n - 1)}) == 4


@given(st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.binary(), st.booleans()))
def test_scalar_types_never_collide(x: Any) -> None:
    forms = {h(x)}
    for other in (str(x), repr(x), [x], (x,), {"v": x}):
        assert h(other) not in forms or other == x


# --- CacheKeyBuilder --------------------------------------------------------------------------


MESSAGES = [{"role": "user", "content": "hi"}]


def test_build_key_is_the_builders_build() -> None:
    # `build_key` calls a `CacheKeyBuilder`'s common case straight into the extension; a
    # subclass's own `build` (and a partition) still go through `build`.
    builder = CacheKeyBuilder(namespace="acme", version=3)
    params = {"temperature": 0.2, "tools": [{"type": "function"}]}
    assert build_key(builder, MESSAGES, "m", params, None) == builder.build(MESSAGES, "m", params)
    assert build_key(builder, MESSAGES, "m", None, "t1") == builder.build(
        MESSAGES, "m", None, partition="t1"
    )

    class Tagged(CacheKeyBuilder):
        __slots__ = ()

        def build(self, *args: Any, **kwargs: Any) -> str:
            return "tagged:" + super().build(*args, **kwargs)

    tagged = Tagged(namespace="acme", version=3)
    key = build_key(tagged, MESSAGES, "m", params, None)
    assert key == "tagged:" + builder.build(MESSAGES, "m", params)


def test_builder_key_shape_and_repr() -> None:
    builder = CacheKeyBuilder("acme", version=3, kind="chat")
    key = builder.build(MESSAGES, "gpt-4o", {"temperature": 0})
    namespace, kind, digest = key.split(":")
    assert (namespace, kind, len(digest)) == ("acme", "chat", 64)
    assert bytes.fromhex(digest) == builder.digest(MESSAGES, "gpt-4o", {"temperature": 0})
    assert repr(builder) == "CacheKeyBuilder(namespace='acme', version=3, kind='chat')"
    assert (builder.namespace, builder.version, builder.kind) == ("acme", 3, "chat")
    with pytest.raises(AttributeError):
        builder.kind = "x"  # type: ignore[misc]


labels = st.text(min_size=1, max_size=6).filter(lambda t: ":" not in t)


@given(
    labels | st.just("a\udc80"),
    st.integers(0, 3) | st.text(max_size=3),
    labels,
    values,
    values,
    st.none() | values,
)
def test_build_is_the_documented_tuple_hashed(
    namespace: str, version: int | str, kind: str, model_id: Any, messages: Any, params: Any
) -> None:
    # `build`'s common call is made whole in the extension (`KeyDeriver`): the same key as the
    # documented tuple hashed by `hash_request`, for any labels (lone surrogates included).
    builder = CacheKeyBuilder(namespace, version=version, kind=kind)
    params_hashed = {} if params is None else params
    request = (KEY_FORMAT, namespace, str(version), kind, model_id, messages, params_hashed)
    expected = f"{namespace}:{kind}:{hash_request(request).hex()}"
    assert builder.build(messages, model_id, params) == expected
    assert builder.build(messages, model_id, params, kind=kind) == expected


def test_builder_digest_is_the_documented_tuple() -> None:
    builder = CacheKeyBuilder()
    expected = hash_request((KEY_FORMAT, "chengeta", "1", "stream", "m", MESSAGES, {"t": 1}))
    assert builder.digest(MESSAGES, "m", {"t": 1}) == expected


def test_everything_that_shapes_the_response_is_in_the_key() -> None:
    b = CacheKeyBuilder()
    base = b.build(MESSAGES, "gpt-4o", {"temperature": 0})
    assert b.build(MESSAGES, "gpt-4o", {"temperature": 0.0}) != base  # 0 and 0.0 differ
    assert b.build(MESSAGES, "gpt-4o", {"temperature": 1}) != base
    assert b.build(MESSAGES, "gpt-4o-mini", {"temperature": 0}) != base
    assert b.build([{"role": "user", "content": "hi!"}], "gpt-4o", {"temperature": 0}) != base
    assert CacheKeyBuilder(version=2).build(MESSAGES, "gpt-4o", {"temperature": 0}) != base
    assert b.build(MESSAGES, "gpt-4o", {"temperature": 0}, kind="x").split(":")[2] != base[-64:]
    assert b.build(tuple(MESSAGES), "gpt-4o", {"temperature": 0}) == base
    assert b.build(MESSAGES) == b.build(MESSAGES, params={})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"namespace": ""}, ValueError, "namespace must not be empty"),
        ({"namespace": "a:b"}, ValueError, "namespace must not contain ':'"),
        ({"kind": ""}, ValueError, "kind must not be empty"),
        ({"kind": "a:b"}, ValueError, "kind must not contain ':'"),
        ({"namespace": 1}, TypeError, "namespace must be a str"),
        ({"version": 1.5}, TypeError, "version must be a str or an int"),
        ({"version": True}, TypeError, "version must be a str or an int"),
    ],
)
def test_builder_validates_its_configuration(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CacheKeyBuilder(**kwargs)


def test_builder_validates_kind_per_call() -> None:
    with pytest.raises(ValueError, match="kind must not contain ':'"):
        CacheKeyBuilder().build(MESSAGES, kind="a:b")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([{"role": "user", "content": {1}}],), "type 'set' at messages[0]['content']"),
        (({1},), "type 'set' at messages"),
        ((MESSAGES, "m", {"stop": {"x"}}), "type 'set' at params['stop']"),
        ((MESSAGES, object()), "type 'object' at model_id"),
    ],
)
def test_builder_errors_name_the_argument(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(TypeError) as info:
        CacheKeyBuilder().build(*args)
    assert message in str(info.value)


def test_builder_passes_errors_from_model_code_through() -> None:
    class Exploding(pydantic.BaseModel):
        role: str

        @pydantic.field_validator("role")
        @classmethod
        def never(cls, value: str) -> str:
            raise ValueError("no at [5] here")

    @dataclasses.dataclass
    class Lazy:
        content: str = "x"

        def __getattribute__(self, name: str) -> Any:
            if name == "content":
                Exploding(role="x")
            return object.__getattribute__(self, name)

    with pytest.raises(pydantic.ValidationError):
        CacheKeyBuilder().build([Lazy()])


def test_builder_accepts_models() -> None:
    b = CacheKeyBuilder()
    model = b.build([ModelMessage(role="user", content="hi")])
    assert model == b.build([ModelMessage(role="user", content="hi", name=None)])
    assert model != b.build(MESSAGES)  # a model is not the dict of its fields
    data = b.build([DataMessage("user", "hi")])
    assert data == b.build([DataMessage("user", "hi", None)])
    assert data != b.build([{**MESSAGES[0], "name": None}])


def test_builder_error_messages_come_from_the_core() -> None:
    # The core names the argument itself; the builder only passes the names along.
    request = (KEY_FORMAT, "chengeta", "1", "stream", "m", [{"c": {1}}], {})
    names = ("key_format", "namespace", "version", "kind", "model_id", "messages", "params")
    with pytest.raises(TypeError) as info:
        hash_request(request, names=names)
    assert str(info.value) == "cannot hash object of type 'set' at messages[0]['c']"
    fine = (*request[:5], [], {})
    assert hash_request(fine, names=names) == hash_request(fine)  # names never change the digest
    with pytest.raises(TypeError) as type_info:
        CacheKeyBuilder().build(MESSAGES, params={"a": 1, frozenset(): 2})
    assert str(type_info.value) == "cannot hash object of type 'frozenset' at params (a dict key)"

    @dataclasses.dataclass(frozen=True, eq=False)
    class ByIdentity:
        x: int

    with pytest.raises(ValueError) as value_info:
        CacheKeyBuilder().build([{"m": {ByIdentity(1): 0, ByIdentity(1): 1}}])
    assert str(value_info.value) == (
        "cannot hash dict at messages[0]['m']: two different keys have the same canonical encoding"
    )
    with pytest.raises(TypeError, match="with names, obj must be a tuple"):
        hash_request([1], names=("a",))
    with pytest.raises(ValueError, match="1 names for a tuple of 2 items"):
        hash_request((1, 2), names=("a",))


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_keys.py --regenerate")
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(regenerated_vectors(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {VECTORS}")
