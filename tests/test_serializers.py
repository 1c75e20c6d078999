"""chengeta_ai.serializers and chengeta_ai.models."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Literal, Optional, Union

import pytest
from pydantic import BaseModel

from chengeta_ai import _core
from chengeta_ai.errors import DecodeError, EncodeError
from chengeta_ai.models import default_model_name, register_known_models, register_model
from chengeta_ai.serializers import (
    CompactSerializer,
    JsonSerializer,
    PickleSerializer,
    Serializer,
)
from chengeta_ai.testing import openai_chunks

ALL: list[Serializer] = [CompactSerializer(), PickleSerializer(), JsonSerializer()]
MODEL_CAPABLE: list[Serializer] = [CompactSerializer(), PickleSerializer()]
JSON_VALUES: list[Any] = [None, True, 0, -5, 2.5, "s", [1, "a", None], {"a": {"b": [1.5]}}]


def flatten(batches: Any) -> list[Any]:
    return [item for batch in batches for item in batch]


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
def test_round_trip_json_values(ser: Serializer, value: Any) -> None:
    assert ser.loads(ser.dumps(value)) == value


@pytest.mark.parametrize("ser", MODEL_CAPABLE, ids=lambda s: s.name)
def test_openai_stream_round_trip(ser: Serializer) -> None:
    chunks = openai_chunks(100)
    sink = ser.stream_encoder()
    for chunk in chunks:
        sink.push(chunk)
    data = sink.finish()
    out = ser.loads(data)
    assert out == chunks and [type(c) for c in out] == [type(c) for c in chunks]
    batches = list(ser.iter_batches(data, batch_size=30))
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 102 and all(1 <= n <= 30 for n in sizes)
    assert sizes[1:-1] == [30] * (len(sizes) - 2), "only the first and last batch may be short"
    assert flatten(batches) == chunks
    assert out[5].choices[0].delta.content == chunks[5].choices[0].delta.content
    assert ser.loads(ser.dumps(chunks[3])) == chunks[3]


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
def test_sink_push_returns_its_size_so_far(ser: Serializer) -> None:
    """The streaming layer takes the size from ``push`` instead of reading ``nbytes`` again."""
    sink = ser.stream_encoder()
    sizes = [sink.push(v) for v in JSON_VALUES]
    assert sizes[-1] == sink.nbytes
    assert all(isinstance(n, int) and n > 0 for n in sizes)
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
def test_iter_batches_of_values(ser: Serializer) -> None:
    assert flatten(ser.iter_batches(ser.dumps(list(range(10))), batch_size=4)) == list(range(10))
    assert list(ser.iter_batches(ser.dumps({"a": 1}))) == [[{"a": 1}]]
    sink = ser.stream_encoder()
    for i in range(5):
        sink.push({"i": i})
    assert flatten(ser.iter_batches(sink.finish(), batch_size=2)) == [{"i": i} for i in range(5)]
    with pytest.raises(ValueError):
        list(ser.iter_batches(ser.dumps(1), batch_size=0))


FOREIGN = [
    b"",
    b"x",
    b"\x80\x05N.",
    b'{"a": 1}',
    b"CGPK\x02junk",
    b"CGJS\x01{not json",
    b"CGCB\x01",
]


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("data", FOREIGN, ids=repr)
def test_foreign_bytes_are_decode_errors(ser: Serializer, data: bytes) -> None:
    with pytest.raises(DecodeError):
        ser.loads(data)
    with pytest.raises(DecodeError):
        flatten(ser.iter_batches(data))


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
def test_other_serializers_data_is_rejected(ser: Serializer) -> None:
    for other in ALL:
        if other.name != ser.name:
            with pytest.raises(DecodeError):
                ser.loads(other.dumps({"a": 1}))


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
def test_truncated_data_is_decode_error(ser: Serializer) -> None:
    data = ser.dumps([{"k": "v" * 50, "n": i} for i in range(20)])
    for cut in range(0, len(data) - 1, 7):
        with pytest.raises(DecodeError):
            flatten(ser.iter_batches(data[:cut]))


@pytest.mark.parametrize("ser", ALL, ids=lambda s: s.name)
def test_unsupported_input_is_encode_error(ser: Serializer) -> None:
    bad = lambda: None  # noqa: E731
    with pytest.raises(EncodeError):
        ser.dumps(bad)
    sink = ser.stream_encoder()
    sink.push({"fine": 1})
    with pytest.raises(EncodeError):
        sink.push({"bad": bad})
    with pytest.raises(EncodeError):
        sink.finish()


def test_json_rejects_lossy_values() -> None:
    ser = JsonSerializer()
    with pytest.raises(EncodeError, match="pydantic model ChatCompletionChunk"):
        ser.dumps(openai_chunks(1)[0])
    for value in ({1, 2}, 2**70, {1: "int key"}, b"bytes"):
        with pytest.raises(EncodeError):
            ser.dumps(value)


def test_magic_prefixes() -> None:
    assert PickleSerializer().dumps(1).startswith(b"CGPK\x01")
    assert JsonSerializer().dumps(1).startswith(b"CGJS\x01")
    assert CompactSerializer().dumps(1).startswith(b"CGCB\x01")
    with pytest.raises(ValueError):
        PickleSerializer(protocol=1)


def test_compact_is_much_smaller_than_pickle() -> None:
    chunks = openai_chunks(500)
    sizes = {}
    for ser in MODEL_CAPABLE:
        sink = ser.stream_encoder()
        for chunk in chunks:
            sink.push(chunk)
        sizes[ser.name] = len(sink.finish())
    assert sizes["compact"] * 10 < sizes["pickle"]


# --------------------------------------------------------------------------- models


class Leaf(BaseModel):
    v: int = 0


class Other(BaseModel):
    s: str = ""


class Mid(BaseModel):
    leaf: Optional[Leaf] = None  # noqa: UP045 (tests unwrapping of typing.Optional)
    many: list[Union[Leaf, Other]] = []  # noqa: UP007 (tests unwrapping of typing.Union)
    kind: Literal["a", "b"] = "a"


class Top(BaseModel):
    mid: dict[str, Mid] = {}
    x: int = 0


def test_register_model_recurses_into_annotations() -> None:
    register_model(Top)
    names = _core.registered_models()
    for cls in (Top, Mid, Leaf, Other):
        assert names[default_model_name(cls)] is cls
    register_model(Top)  # idempotent
    value = Top(mid={"m": Mid(leaf=Leaf(v=1), many=[Other(s="o"), Leaf()])}, x=2)
    assert CompactSerializer().loads(CompactSerializer().dumps(value)) == value


def test_register_model_custom_name() -> None:
    class Named(BaseModel):
        leaf: Leaf = Leaf()

    register_model(Named, "tests.named.v1")
    assert _core.registered_models()["tests.named.v1"] is Named
    with pytest.raises(ValueError):
        register_model(Other, "tests.named.v1")


def test_register_known_models_is_idempotent() -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    register_known_models()
    register_known_models()
    registered = set(_core.registered_models().values())
    assert ChatCompletionChunk in registered and Completion in registered


def test_import_registers_nothing_and_imports_no_sdk() -> None:
    code = (
        "import sys, chengeta_ai, chengeta_ai.models, chengeta_ai.serializers\n"
        "from chengeta_ai import _core\n"
        "assert _core.registered_models() == {}, _core.registered_models()\n"
        "assert 'openai' not in sys.modules and 'pydantic' not in sys.modules\n"
        "ser = chengeta_ai.serializers.CompactSerializer()\n"
        "assert ser.loads(ser.dumps([1])) == [1]\n"
        "assert _core.registered_models()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
