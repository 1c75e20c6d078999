"""Object-for-object equality of a replayed value and the original."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def assert_identical(a: Any, b: Any, path: str = "value") -> None:
    """``a`` and ``b`` are equal and of the same types all the way down; pydantic models also
    have the same ``model_fields_set``, extras, private attributes and JSON dump."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    assert a == b, f"{path}: {a!r} != {b!r}"
    if isinstance(a, BaseModel):
        assert a.model_fields_set == b.model_fields_set, f"{path}: fields set differ"
        assert a.__pydantic_extra__ == b.__pydantic_extra__, f"{path}: extras differ"
        assert a.__pydantic_private__ == b.__pydantic_private__, f"{path}: private attrs differ"
        # (warnings off: the SDKs' generic helper objects warn about their own TypeVars)
        dump_a, dump_b = a.model_dump_json(warnings=False), b.model_dump_json(warnings=False)
        assert dump_a == dump_b, f"{path}: JSON dumps differ"
        for name, value in a.__dict__.items():
            assert_identical(value, b.__dict__[name], f"{path}.{name}")
        for name, value in (a.__pydantic_extra__ or {}).items():
            assert_identical(value, (b.__pydantic_extra__ or {})[name], f"{path}.{name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{path}[{k!r}]")
