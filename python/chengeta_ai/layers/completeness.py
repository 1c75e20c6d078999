"""When is a stream complete? Only a complete stream is stored.

An HTTP stream that the server (or a proxy) ends cleanly half way looks, to the SDK, like a
normal end: no error, just fewer chunks. For the SDK types we know, a stream is complete only
when it carries its terminal event:

- OpenAI Chat Completions (`ChatCompletionChunk`) and Completions (`Completion`): every choice
  that appeared has a ``finish_reason``; and a stream whose chunks carry ``usage`` (an explicit
  ``null`` in every chunk: the request asked ``stream_options={"include_usage": True}``) ends
  with its usage: the API sends it alone after the last ``finish_reason`` (``choices=[]``),
  some compatible providers on the ``finish_reason`` chunk itself;
- the events of the SDK's ``client.chat.completions.stream(...)`` helper
  (``openai.lib.streaming.chat``): the same rule, over the chunks its ``chunk`` events carry;
- OpenAI Responses events, also those of ``client.responses.stream(...)``
  (``openai.lib.streaming.responses``): the last event is ``response.completed`` (or
  ``response.incomplete``, the API's own deterministic end for a request cut by
  ``max_output_tokens``);
- Anthropic Messages events: the last event is ``message_stop``.

An empty stream is never complete. A stream written by a cached client (`chengeta_ai.clients`)
starts with the HTTP head of its response (an object whose class has ``chengeta_http_head =
True``, recognised by that attribute): the rule applies to the items after it (and a head that
records ``expects_usage``, a request with ``stream_options.include_usage``, requires the usage
chunk last, Completions included), and a head recorded for a non-streamed call
(``stream=False``) is complete with exactly one object after it. Any other chunk type (strings,
dicts, your own classes) is complete when its upstream ends without error: pass ``is_complete=``
to `StreamingResponseCache` to say otherwise. The SDKs are recognised by module name, never
imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["sdk_stream_complete"]

_RESPONSES_DONE = frozenset({"response.completed", "response.incomplete"})


def sdk_stream_complete(chunks: Sequence[Any]) -> bool:
    """The default completeness rule (see the module docstring)."""
    if not chunks:
        return False
    first = chunks[0]
    if getattr(type(first), "chengeta_http_head", False):
        if not getattr(first, "stream", True):
            return len(chunks) == 2
        chunks = chunks[1:]
        if not chunks:
            return False
        if getattr(first, "expects_usage", False) is True:
            # the request asked for the usage chunk (the cached client knows the request,
            # for Completions too, whose chunks do not announce it)
            if getattr(chunks[-1], "usage", None) is None:
                return False
    last = chunks[-1]
    module = type(last).__module__
    if module.startswith("openai."):
        if module.startswith(("openai.types.responses", "openai.lib.streaming.responses")):
            return getattr(last, "type", None) in _RESPONSES_DONE
        if module.startswith("openai.lib.streaming.chat"):
            # the helper's events: its ``chunk`` events carry the API's chunks
            return _chat_complete([e.chunk for e in chunks if getattr(e, "type", None) == "chunk"])
        if hasattr(last, "choices"):
            return _chat_complete(chunks)
        return True
    if module.startswith("anthropic."):
        return getattr(last, "type", None) == "message_stop"
    return True


def _chat_complete(chunks: Sequence[Any]) -> bool:
    """A Chat Completions / Completions stream: every choice finished, and the usage chunk
    last when the chunks say usage was asked for (``usage`` set, to null, in the first)."""
    if not chunks or not _every_choice_finished(chunks):
        return False
    if "usage" in (getattr(chunks[0], "model_fields_set", None) or ()):
        # the usage arrives last: alone (OpenAI: ``choices=[]``) or on the finish_reason
        # chunk (some compatible providers)
        return getattr(chunks[-1], "usage", None) is not None
    return True


def _every_choice_finished(chunks: Sequence[Any]) -> bool:
    """Every choice index seen has a finish_reason (a trailing usage chunk has no choices)."""
    seen: set[int] = set()
    finished: set[int] = set()
    for chunk in chunks:
        for choice in getattr(chunk, "choices", None) or ():
            index = choice.index
            seen.add(index)
            if choice.finish_reason is not None:
                finished.add(index)
    return bool(finished) and seen <= finished
