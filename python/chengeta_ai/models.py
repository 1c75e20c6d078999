"""Registration of pydantic model classes with the compact codec.

The compact format stores model instances by a stable *name* and rebuilds them without
validation; decoding only ever builds classes registered here (it never imports anything named
by the data). `register_model` registers a class and, recursively, the model classes reachable
from its field annotations; `register_known_models` registers the SDK classes the cache layers
meet (see its doc: every stream type the OpenAI and Anthropic SDKs produce).

Nested classes reached only through run-time values (LiteLLM's ``ModelResponseStream`` keeps its
``Delta`` and ``Usage`` in fields declared without them) are discovered on the writing side: the
encoder asks `_discover` about an unregistered pydantic class met *inside* a registered model
instance, and it is registered then (under its default name). A top-level item of an
unregistered class is never registered behind your back. The reading side only builds what is
registered in its own process: a process that only reads entries holding such classes must
register them (or write one such entry) first; until then the entry is dropped as undecodable.

An unregistered class is logged once per class per process (`report_unregistered`), with the
exact call that fixes it.
"""

from __future__ import annotations

import logging
import re
import threading
import typing
from typing import Any

__all__ = [
    "default_model_name",
    "register_known_models",
    "register_model",
    "report_unregistered",
]

logger = logging.getLogger("chengeta_ai")

_known_lock = threading.Lock()
_known_done = False
_hook_installed = False
#: Class names already reported as unregistered in this process (guarded by `_known_lock`).
_reported: set[str] = set()
#: The encoder's message for an unregistered class, and the decoder's for an unknown name.
_UNREGISTERED = re.compile(
    r"unregistered model class '([^']+)'|unknown model class name \"([^\"]+)\""
)


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
    left alone. Model classes that instances of ``cls`` hold only at run time (in fields whose
    annotations do not name them, or in extras) are registered when the first such instance is
    written (see the module doc).
    """
    from chengeta_ai import _core

    _install_discovery_hook()

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


def _openai_known() -> list[Any]:
    """Every class or union of classes of the OpenAI SDK that a cached call meets."""
    from openai.lib.streaming.chat import ChatCompletionStreamEvent
    from openai.lib.streaming.responses import ResponseStreamEvent as ResponseHelperEvent
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk, ParsedChatCompletion
    from openai.types.responses import ParsedResponse, Response, ResponseStreamEvent

    return [
        # Chat Completions and legacy Completions: chunks and whole objects
        ChatCompletionChunk,
        ChatCompletion,
        Completion,
        # Responses API: every stream event, the whole response
        ResponseStreamEvent,
        Response,
        # the helpers' events (`chat.completions.stream(...)`, `responses.stream(...)`) and
        # their final objects
        ChatCompletionStreamEvent,
        ResponseHelperEvent,
        ParsedChatCompletion,
        ParsedResponse,
    ]


def _anthropic_known() -> list[Any]:
    """Every class or union of classes of the Anthropic SDK that a cached call meets."""
    from anthropic.lib.streaming import (  # type: ignore[import-not-found, unused-ignore]
        MessageStreamEvent,
        ParsedMessageStreamEvent,
    )
    from anthropic.types import (  # type: ignore[import-not-found, unused-ignore]
        Message,
        RawMessageStreamEvent,
    )

    return [RawMessageStreamEvent, Message, MessageStreamEvent, ParsedMessageStreamEvent]


def known_models_registered() -> bool:
    """Whether `register_known_models` has run to its end in this process."""
    return _known_done


def register_known_models() -> None:
    """Register the SDK response classes chengeta_ai caches out of the box.

    OpenAI: ``ChatCompletionChunk``, ``ChatCompletion``, legacy ``Completion``, every Responses
    API stream event and ``Response``, and the events of the SDK's stream helpers
    (``chat.completions.stream``: ``ChunkEvent``, ``ContentDeltaEvent``, ...;
    ``responses.stream``) with their parsed final objects. Anthropic: every
    ``RawMessageStreamEvent``, ``Message`` and the ``messages.stream`` helper's events
    (``TextEvent``, ``ParsedMessageStopEvent``, ...). Each is registered with the model
    classes its fields refer to. Packages that are not installed (or too old to have one of
    these names) are skipped. Idempotent and cheap after the first call.
    """
    global _known_done
    if _known_done:
        return
    with _known_lock:
        if _known_done:
            return
        _install_discovery_hook()
        for family in (_openai_known, _anthropic_known):
            try:
                roots = family()
            except ImportError:
                continue
            found: list[type] = []
            seen: set[int] = set()
            for root in roots:
                _model_classes(root, found, seen)
            for cls in found:
                register_model(cls)
        _known_done = True


def _install_discovery_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        from chengeta_ai import _core

        _core.set_discovery_hook(_discover)
        _hook_installed = True


def _discover(cls: type) -> bool:
    """The encoder's discovery hook: ``cls`` (an unregistered pydantic class) was met inside a
    registered model instance being written. Registers it; False if it cannot be."""
    try:
        register_model(cls)
    except (TypeError, ValueError) as exc:  # e.g. its default name is taken by another class
        logger.debug("chengeta_ai: cannot register nested class %r: %s", cls, exc)
        return False
    logger.debug("chengeta_ai: registered %s, met inside a registered model", cls.__qualname__)
    return True


def report_unregistered(message: str) -> bool:
    """Whether an encoding or decoding error ``message`` is about an unregistered model class.

    The first time per class per process, logs a warning with the call that fixes it; later
    occurrences are left to the caller (which logs them at debug level).
    """
    match = _UNREGISTERED.search(message)
    if match is None:
        return False
    name = match.group(1) or match.group(2)
    with _known_lock:
        first = name not in _reported
        _reported.add(name)
    if first:
        module, _, qualname = name.rpartition(".")
        logger.warning(
            "chengeta_ai: model class %s is not registered, so streams holding it are not "
            "cached (or, when reading, not replayed); register it once at start-up: "
            "`from %s import %s; chengeta_ai.register_model(%s)` (logged once per class)",
            name,
            module or "<module>",
            qualname.partition(".")[0] or name,
            qualname or name,
        )
    return True
