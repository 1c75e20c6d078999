"""Regression of s7-pump-lean (b7e190d); holds on main (3428a97).

The sync flight's pull lock was ``threading.RLock()``, looked up when the flight is made: under
gevent's monkey-patching (``gevent.monkey.patch_all()``, e.g. a gunicorn ``-k gevent``
worker, the usual way to serve many sync callers at once) that is gevent's RLock, owned by a
*greenlet*. `PullLock` is owned by the OS thread (``PyThread_get_thread_ident``, which gevent
does not patch), and every greenlet of a worker runs on the same OS thread: while one caller's
greenlet reads the upstream with the lock held and yields to the hub on network I/O, another
caller of the same request takes the "held" lock as a reentrant hold and reads the same
upstream at the same time. Every caller of a shared request then gets ``ValueError:
generator already executing`` or ``RuntimeError: cannot release un-acquired lock`` instead of
its stream, and nothing is stored. (The blocking ``with pull_lock`` of ``cancel_upstream`` /
``_drain`` would also stop the whole worker rather than yield to the hub.)

Each case runs in its own process (monkey-patching is for a whole process), with real
greenlets; the ``openai`` case reads real SDK streams over HTTP from the local server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import chengeta_ai
from chengeta_ai.demo.server import LocalOpenAIServer

pytest.importorskip("gevent")

CALLERS = 4

SCRIPT = textwrap.dedent(
    """
    import gevent.monkey

    gevent.monkey.patch_all()

    import json
    import sys

    import gevent
    import openai

    from chengeta_ai import CacheManager, InMemoryBackend
    from chengeta_ai.layers.streaming_cache import StreamingResponseCache

    kind, base_url, callers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = StreamingResponseCache(CacheManager(backend=InMemoryBackend()))
    messages = [{"role": "user", "content": "greenlets share one stream"}]
    client = openai.OpenAI(base_url=base_url, api_key="sk-local", max_retries=0)

    def generator_upstream(_messages):
        for i in range(20):
            gevent.sleep(0.002)  # network I/O: the greenlet yields to the hub
            yield f"tok{i}"

    def openai_upstream(messages):
        return client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)

    upstream = generator_upstream if kind == "generator" else openai_upstream

    def text(chunk):
        if isinstance(chunk, str):
            return chunk
        return chunk.choices[0].delta.content if chunk.choices else None

    def caller():
        try:
            return [text(c) for c in cache.get_or_stream(messages, upstream)]
        except BaseException as exc:
            return repr(exc)

    greenlets = [gevent.spawn(caller) for _ in range(callers)]
    gevent.joinall(greenlets, timeout=30)
    print(json.dumps({
        "results": [g.value for g in greenlets],
        "stores": cache.stats()["stores"],
    }))
    """
)


@pytest.mark.parametrize("kind", ["generator", "openai"])
def test_greenlets_of_one_worker_share_a_stream_under_gevent(
    kind: str, server: LocalOpenAIServer
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind, server.base_url, str(CALLERS)],
        capture_output=True,
        text=True,
        timeout=120,
        # the package this test imported, whatever the checkout
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(chengeta_ai.__file__))},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    results = out["results"]
    errors = [r for r in results if not isinstance(r, list)]
    # b7e190d: every caller gets "ValueError('generator already executing')" or
    # "RuntimeError('cannot release un-acquired lock')"
    assert errors == []
    assert all(r == results[0] for r in results)
    assert len(results[0]) > 10
    assert out["stores"] == 1
