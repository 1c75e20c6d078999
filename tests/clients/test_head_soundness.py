"""`head_is_sound`: a stored HTTP head the codec rebuilt without validation is refused when the
response cannot be built from it (review s4: planted heads crashed `.response` and the helpers)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from chengeta_ai.clients.recorded import HttpHead, head_fits, head_is_sound, recorded_response

GOOD = HttpHead.model_construct(
    stream=True,
    status_code=200,
    reason_phrase="OK",
    http_version="HTTP/1.1",
    method="POST",
    url="https://api.openai.com/v1/chat/completions",
    headers=[("x-request-id", "req_1"), ("content-type", "text/event-stream; charset=utf-8")],
    endpoint="openai.chat.completions",
)

BAD: dict[str, dict[str, Any]] = {
    "url-does-not-parse": {"url": "http://[::1"},
    "url-not-str": {"url": 5},
    "headers-not-list": {"headers": 5},
    "header-not-pair": {"headers": [("x",)]},
    "header-value-not-str": {"headers": [("x", 1)]},
    "header-name-not-ascii": {"headers": [("\u00e9", "v")]},
    "status-not-int": {"status_code": "200"},
    "status-bool": {"status_code": True},
    "status-out-of-range": {"status_code": 99999},
    "method-not-a-token": {"method": "PO ST"},
    "http-version-unknown": {"http_version": "SPDY/9"},
    "reason-not-str": {"reason_phrase": None},
    "stream-not-bool": {"stream": 1},
}


def test_a_sound_head_fits_and_builds() -> None:
    assert head_is_sound(GOOD)
    assert head_fits(GOOD, "openai.chat.completions", stream=True)
    response = recorded_response(httpx, GOOD, elapsed=0.1, close=lambda: None, is_async=False)
    assert response.status_code == 200 and response.headers["x-request-id"] == "req_1"


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_a_head_that_cannot_build_a_response_does_not_fit(bad: dict[str, Any]) -> None:
    head = GOOD.model_copy(update=bad)
    assert not head_is_sound(head)
    assert not head_fits(head, "openai.chat.completions", stream=head.stream is True)


def test_an_old_head_without_url_is_sound() -> None:
    assert head_is_sound(GOOD.model_copy(update={"url": "", "endpoint": ""}))
