"""Different requests never share a key; equal requests always do (key format 3).

A request hashes what will be sent: a pydantic model, a dataclass or a named tuple hashes as
its class (module + qualname) and *every* field value, defaults included (plus a model's
extras), never as the dict of the fields that happen to be set. The regression tests below
each failed on format 2 (checked against the format-2 build before the change).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import random
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chengeta_ai._core import hash_request
from chengeta_ai.core.key_builder import CacheKeyBuilder

BUILDER = CacheKeyBuilder()
MESSAGES = [{"role": "user", "content": "hi"}]


def key(messages: Any, params: Any = None) -> str:
    return BUILDER.build(messages, "gpt-4o-mini", params)


# --- the classes the regressions and the properties use ---------------------------------------


class BaseMessage(pydantic.BaseModel):
    """LangChain's shape: the message kind is a field whose value is a class default."""

    content: Any
    type: str


class HumanMessage(BaseMessage):
    type: Literal["human"] = "human"


class SystemMessage(BaseMessage):
    type: Literal["system"] = "system"


class HumanMessageTwin(pydantic.BaseModel):
    """Same fields and defaults as HumanMessage; another class."""

    content: Any
    type: str = "human"


class HumanMessageSub(HumanMessage):
    """A subclass that adds nothing."""


class LooseMessage(pydantic.BaseModel, extra="allow"):
    content: Any = None


class Params(pydantic.BaseModel):
    temperature: float = 1.0
    stop: Any = None


class PreciseParams(Params):
    temperature: float = 0.0


@dataclasses.dataclass
class DataMessage:
    content: Any
    role: str = "user"


@dataclasses.dataclass
class DataMessageTwin:
    content: Any
    role: str = "user"


class Pair(NamedTuple):
    role: Any
    content: Any


class PairTwin(NamedTuple):
    role: Any
    content: Any


# --- regressions: each of these shared a key in format 2 --------------------------------------


def test_langchain_style_messages_with_a_class_default_type_differ() -> None:
    # Format 2 hashed both as {"content": "x"}: the system prompt was answered from the cache
    # of a user turn.
    assert key([HumanMessage(content="x")]) != key([SystemMessage(content="x")])
    assert hash_request(HumanMessage(content="x")) != hash_request(SystemMessage(content="x"))


def test_params_models_with_different_default_temperature_differ() -> None:
    assert key(MESSAGES, Params()) != key(MESSAGES, PreciseParams())
    assert key(MESSAGES, Params()) != key(MESSAGES, {})


def test_dataclasses_of_different_classes_with_equal_fields_differ() -> None:
    assert key([DataMessage("x")]) != key([DataMessageTwin("x")])


def test_models_of_different_classes_with_equal_fields_differ() -> None:
    assert key([HumanMessage(content="x")]) != key([HumanMessageTwin(content="x")])
    assert key([HumanMessage(content="x")]) != key([HumanMessageSub(content="x")])


def test_models_and_dataclasses_differ_from_the_dict_of_their_fields() -> None:
    as_dict = {"content": "x", "type": "human"}
    assert hash_request(HumanMessage(content="x")) != hash_request(as_dict)
    assert hash_request(HumanMessage(content="x")) != hash_request({"content": "x"})
    assert hash_request(DataMessage("x")) != hash_request({"content": "x", "role": "user"})


def test_a_default_and_the_same_value_set_explicitly_are_one_request() -> None:
    # What is sent is the same, so is the key (format 2 split these on the fields set).
    assert key([HumanMessage(content="x")]) == key([HumanMessage(content="x", type="human")])
    assert key(MESSAGES, Params()) == key(MESSAGES, Params(temperature=1.0, stop=None))


def test_named_tuples_hash_as_records() -> None:
    assert hash_request(Pair("user", "x")) != hash_request(PairTwin("user", "x"))
    assert hash_request(Pair("user", "x")) != hash_request(("user", "x"))
    assert hash_request(Pair("user", "x")) == hash_request(Pair(role="user", content="x"))


def test_enum_members_of_value_types_hash_as_their_value() -> None:
    class Role(str, enum.Enum):
        USER = "user"

    class Level(enum.IntEnum):
        HIGH = 3

    assert hash_request(Role.USER) == hash_request("user")
    assert hash_request(Level.HIGH) == hash_request(3)


def test_model_fields_not_values_of_the_instance_dict() -> None:
    # A functools.cached_property lives in the instance __dict__ but is no field: reading it
    # must not change the key.
    import functools

    class Cached(pydantic.BaseModel):
        content: str

        @functools.cached_property
        def shout(self) -> str:
            return self.content.upper()

    msg = Cached(content="x")
    before = hash_request(msg)
    assert msg.shout == "X"
    assert hash_request(msg) == before


def test_a_redefined_class_is_not_confused_with_the_old_one() -> None:
    # The per-class cache is keyed by the class object, not its name: a class redefined under
    # the same name, with other fields, hashes by its own fields.
    def make(fields: dict[str, Any]) -> type[pydantic.BaseModel]:
        model: type[pydantic.BaseModel] = pydantic.create_model("Redefined", **fields)
        return model

    first = make({"a": (int, 1)})
    old = hash_request(first())
    second = make({"a": (int, 1), "b": (int, 2)})
    assert hash_request(second()) != old
    assert hash_request(first()) == old
    # Same name, same fields, same values: the same request (identity is module + qualname).
    assert hash_request(make({"a": (int, 1)})()) == old


def test_many_classes_churning_through_the_class_cache() -> None:
    # More classes than the cache holds (it is dropped and refilled), made and freed on the
    # fly (their addresses get reused): each request still hashes by its own class's facts.
    seen = set()
    for i in range(1100):  # the cache holds 1024 classes
        field = f"f{i % 3}"
        cls = pydantic.create_model(f"Churn{i % 7}", **{field: (int, i % 5)})
        seen.add((cls.__qualname__, field, i % 5, hash_request(cls())))
    requests = {(q, f, x) for q, f, x, _ in seen}
    assert len({digest for *_, digest in seen}) == len(requests) == len(seen) == 7 * 3 * 5


def test_classes_hashed_from_many_threads_at_once() -> None:
    import threading

    expected = {cls: hash_request(cls(content="x")) for cls in (HumanMessage, DataMessage)}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(150):
                fresh = pydantic.create_model(f"Thread{n}_{i % 4}", x=(int, i))
                assert hash_request(fresh()) != hash_request(fresh(x=i + 1))
                for cls, digest in expected.items():
                    assert hash_request(cls(content="x")) == digest
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_record_holding_itself_is_the_depth_error() -> None:
    @dataclasses.dataclass
    class Node:
        child: Any = None

    node = Node()
    node.child = node
    with pytest.raises(ValueError, match="containing itself"):
        hash_request([node])
    with pytest.raises(TypeError, match=r"type 'set' at messages\[0\]\.content\['k'\]"):
        key([HumanMessage(content={"k": {1}})])


# --- properties ---------------------------------------------------------------------------------

# Small domains on purpose: equal values come up often, and so do near misses (1, 1.0, True).
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 2),
    st.sampled_from([0.0, -0.0, 1.0, 0.5]),
    st.sampled_from(["", "x", "hi", "human", "user"]),
)
dict_keys = st.sampled_from(["role", "content", "type", "a"])


def model_of(
    cls: type[Any], required: list[str], optional: list[str], inner: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {name: inner for name in required}, optional={name: inner for name in optional}
    ).map(lambda kwargs: cls(**kwargs))


def records(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    texts = st.sampled_from(["human", "system", "user"])
    return st.one_of(
        model_of(HumanMessage, ["content"], [], inner),
        model_of(SystemMessage, ["content"], [], inner),
        model_of(HumanMessageTwin, ["content"], ["type"], texts),
        model_of(HumanMessageSub, ["content"], [], inner),
        model_of(LooseMessage, [], ["content", "a", "b"], inner),
        model_of(DataMessage, ["content"], ["role"], texts),
        model_of(DataMessageTwin, ["content"], ["role"], texts),
        st.builds(Pair, inner, inner),
        st.builds(PairTwin, inner, inner),
    )


values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(dict_keys, inner, max_size=3),
        records(inner),
    ),
    max_leaves=10,
)
params_values = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["temperature", "stop"]), values, max_size=2),
    model_of(Params, [], ["temperature"], st.sampled_from([0.0, 0.5, 1.0])),
    model_of(PreciseParams, [], ["temperature"], st.sampled_from([0.0, 0.5, 1.0])),
    model_of(Params, [], ["stop"], values),
)
requests = st.tuples(st.lists(values, min_size=1, max_size=3), params_values)


def fields_of(obj: Any) -> dict[str, Any] | None:
    """Every field a record sends (defaults included), or None for a non-record."""
    if isinstance(obj, pydantic.BaseModel):
        fields = {name: obj.__dict__[name] for name in type(obj).model_fields}
        fields.update(obj.__pydantic_extra__ or {})
        return fields
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return dict(zip(type(obj)._fields, obj, strict=True))
    return None


def canon(obj: Any) -> Any:
    """The request as format 3 sees it: two requests share a key iff their canon is equal."""
    fields = fields_of(obj)
    if fields is not None:
        cls = type(obj)
        items = sorted((name, canon(value)) for name, value in fields.items())
        return ("record", cls.__module__, cls.__qualname__, repr(items))
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


def request_canon(request: tuple[Any, Any]) -> str:
    messages, params = request
    return repr(canon((messages, {} if params is None else params)))


def request_key(request: tuple[Any, Any]) -> str:
    return key(*request)


def equivalent(obj: Any, rng: random.Random) -> Any:
    """The same request rebuilt another way: copies, defaults spelt out, dicts reordered."""
    fields = fields_of(obj)
    if isinstance(obj, pydantic.BaseModel):
        assert fields is not None
        choice = rng.randrange(3)
        if choice == 0:
            return obj.model_copy()
        if choice == 1:
            return obj.model_copy(deep=True)
        # Every field set explicitly (model_construct keeps unknown names as extras).
        rebuilt = {name: equivalent(value, rng) for name, value in fields.items()}
        return type(obj).model_construct(**dict(sorted(rebuilt.items(), reverse=True)))
    if fields is not None and isinstance(obj, tuple):
        return type(obj)(*(equivalent(v, rng) for v in obj))
    if fields is not None:
        return type(obj)(**{k: equivalent(v, rng) for k, v in fields.items()})
    if isinstance(obj, dict):
        items = [(k, equivalent(v, rng)) for k, v in obj.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(obj, (list, tuple)):
        rebuilt_items = [equivalent(v, rng) for v in obj]
        return tuple(rebuilt_items) if rng.random() < 0.5 else rebuilt_items
    if isinstance(obj, float) and obj == 0.0:
        return -obj
    return obj


TWINS: dict[type[Any], list[type[Any]]] = {
    HumanMessage: [HumanMessageTwin, HumanMessageSub],
    HumanMessageTwin: [HumanMessage],
    HumanMessageSub: [HumanMessage],
    DataMessage: [DataMessageTwin],
    DataMessageTwin: [DataMessage],
    Params: [PreciseParams],
    PreciseParams: [Params],
    Pair: [PairTwin],
    PairTwin: [Pair],
}
CHANGED = "<changed>"


def one_change(obj: Any) -> Iterator[Any]:
    """Every request that differs from `obj` in exactly one place: a field value, a record's
    class (a twin with equal fields, a subclass or base, the plain dict of its fields) or a
    leaf inside any list, dict or record."""
    fields = fields_of(obj)
    if fields is not None:
        cls = type(obj)
        for twin in TWINS.get(cls, []):
            if isinstance(obj, pydantic.BaseModel):
                yield twin.model_construct(**fields)
            elif isinstance(obj, tuple):
                yield twin(*obj)
            else:
                yield twin(**fields)
        yield dict(fields)
        for name, value in fields.items():
            for changed in [CHANGED, *one_change(value)]:
                if isinstance(obj, pydantic.BaseModel):
                    yield obj.model_copy(update={name: changed})
                elif isinstance(obj, tuple):
                    yield obj._replace(**{name: changed})  # type: ignore[attr-defined]
                else:
                    yield dataclasses.replace(obj, **{name: changed})
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            for changed in [CHANGED, *one_change(v)]:
                yield {**obj, k: changed}
        yield {**obj, CHANGED: None}
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for changed in [CHANGED, *one_change(v)]:
                yield [*obj[:i], changed, *obj[i + 1 :]]
        yield [*obj, None]
        return
    yield CHANGED if obj != CHANGED else "<changed again>"


FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(requests)
def test_a_request_changed_in_any_one_place_never_shares_its_key(
    request: tuple[Any, Any],
) -> None:
    messages, params = request
    original = request_key(request)
    original_canon = request_canon(request)
    variants: list[tuple[Any, Any]] = [(m, params) for m in one_change(messages)]
    if params is not None:
        variants += [(messages, p) for p in one_change(params)]
    for variant in variants[:200]:
        assert request_canon(variant) != original_canon, variant  # the test's own premise
        assert request_key(variant) != original, variant


@FAST
@given(requests, st.randoms(use_true_random=False))
def test_equal_requests_share_a_key(request: tuple[Any, Any], rng: random.Random) -> None:
    same = equivalent(request, rng)
    assert request_canon(same) == request_canon(request)
    assert request_key(same) == request_key(request)
    assert request_key(copy.deepcopy(request)) == request_key(request)


@FAST
@given(requests, requests)
def test_keys_are_equal_exactly_when_requests_are(a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
    assert (request_key(a) == request_key(b)) == (request_canon(a) == request_canon(b))


@pytest.mark.parametrize("cls", [HumanMessage, DataMessage])
def test_records_nested_in_messages_and_params(cls: type[Any]) -> None:
    msg = cls(content="x")
    twin = TWINS[cls][0](content="x")
    assert key([{"role": "user", "content": [msg]}]) != key([{"role": "user", "content": [twin]}])
    assert key(MESSAGES, {"extra": {"m": msg}}) != key(MESSAGES, {"extra": {"m": twin}})
