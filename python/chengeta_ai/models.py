"""Registration of pydantic model classes with the compact codec.

The compact format stores model instances by a stable *name* and rebuilds them without
validation; decoding only ever builds classes registered here (it never imports anything named
by the data). `register_model` registers a class and, recursively, the model classes reachable
from its field annotations; `register_known_models` registers the SDK classes the cache layers
meet (OpenAI chat/legacy completions, Anthropic stream events when installed).
"""

from __future__ import annotations

import threading
import typing
from typing import Any

__all__ = ["default_model_name", "register_known_models", "register_model"]

_known_lock = threading.Lock()
_known_done = False


def default_model_name(cls: type) -> str:
    """The name a class is registered under by default: ``module.qualname``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _model_classes(annotation: Any, out: list[type], seen: set[int]) -> None:
    """Collect the BaseModel subclasses in a type annotation (Optional/List/Union/... unwrapped)."""
    from pydantic import BaseModel

    if id(annotation) in seen:
        return
    seen.add(id(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation is not BaseModel:
            out.append(annotation)
        return
    if typing.get_origin(annotation) is typing.Literal:
        return
    for arg in typing.get_args(annotation):
        _model_classes(arg, out, seen)


def register_model(cls: type, name: str | None = None) -> None:
    """Register a pydantic model class (and the model classes its fields refer to).

    ``name`` (default ``f"{cls.__module__}.{cls.__qualname__}"``) is written into encoded data
    and must stay stable across versions of your code. Re-registering is a no-op; a name bound
    to another class raises ``ValueError``. Nested classes already registered under any name are
    left alone.
    """
    from chengeta_ai import _core

    registered = {id(c) for c in _core.registered_models().values()}
    if name is not None or id(cls) not in registered:
        _core.register_model(cls, name or default_model_name(cls))
        registered.add(id(cls))
    stack: list[type] = [cls]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        nested: list[type] = []
        for field in getattr(current, "model_fields", {}).values():
            _model_classes(field.annotation, nested, seen)
        for sub in nested:
            if id(sub) not in registered:
                _core.register_model(sub, default_model_name(sub))
                registered.add(id(sub))
                stack.append(sub)


def register_known_models() -> None:
    """Register the SDK response classes chengeta_ai caches out of the box.

    OpenAI: ``ChatCompletionChunk``, ``ChatCompletion`` and legacy ``Completion``; Anthropic
    (when importable): the members of ``RawMessageStreamEvent``. Packages that fail to import
    are skipped. Idempotent and cheap after the first call.
    """
    global _known_done
    if _known_done:
        return
    with _known_lock:
        if _known_done:
            return
        try:
            from openai.types import Completion
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            pass
        else:
            sdk_classes: tuple[type, ...] = (ChatCompletionChunk, ChatCompletion, Completion)
            for sdk_cls in sdk_classes:
                register_model(sdk_cls)
        try:
            from anthropic.types import (  # type: ignore[import-not-found, unused-ignore]
                RawMessageStreamEvent,
            )
        except ImportError:
            pass
        else:
            found: list[type] = []
            _model_classes(RawMessageStreamEvent, found, set())
            for cls in found:
                register_model(cls)
        _known_done = True
