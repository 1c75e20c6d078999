"""The user-facing page's snippets (and the README's first example) run as written.

The snippets below are copied verbatim from the ``StreamingResponseCache`` page (the seed text
at /work/shared/seed/streaming-response-cache.txt lost its indentation; it is restored here).
They create ``openai.OpenAI()`` with no arguments: the test points that client at a local
OpenAI-compatible server through the ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` environment
variables, which the client reads, so the snippet text itself is not touched.

Two things the page's async snippet leaves to the reader, and which this test supplies,
explicitly and nothing more: ``create(..., stream=True)`` has a literal ``...`` for the
arguments (``model="gpt-4o", messages=messages`` here), and it awaits ``client`` from the sync
snippet, which must be an ``openai.AsyncOpenAI()`` for ``await`` to work. Its top-level
``async for`` runs as a top-level-await snippet (like ``python -m asyncio`` or a notebook).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from chengeta_ai.demo.server import LocalOpenAIServer

ROOT = Path(__file__).resolve().parent.parent

PAGE_SYNC = """\
import openai
from chengeta_ai import CacheManager, InMemoryBackend, CacheKeyBuilder
from chengeta_ai.layers.streaming_cache import StreamingResponseCache

client = openai.OpenAI()
manager = CacheManager(backend=InMemoryBackend(), key_builder=CacheKeyBuilder())
stream_cache = StreamingResponseCache(manager)

def stream_fn(messages):
    return client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
        stream=True,
    )

messages = [{"role": "user", "content": "Explain caching in 3 sentences"}]

# First call — live stream, buffered and cached
for chunk in stream_cache.get_or_stream(messages, stream_fn, model_id="gpt-4o"):
    print(chunk.choices[0].delta.content or "", end="", flush=True)

print()

# Second call — replayed from cache at full speed
for chunk in stream_cache.get_or_stream(messages, stream_fn, model_id="gpt-4o"):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
"""

PAGE_ASYNC = """\
async def async_stream_fn(messages):
    async for chunk in await client.chat.completions.create(..., stream=True):
        yield chunk

async for chunk in stream_cache.aget_or_stream(messages, async_stream_fn, model_id="gpt-4o"):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
"""

PAGE_CHUNK_JOINER = """\
stream_cache = StreamingResponseCache(
    manager,
    chunk_joiner=lambda chunks: "".join(
        c.choices[0].delta.content or "" for c in chunks
    ),
)
"""

MESSAGES = [{"role": "user", "content": "Explain caching in 3 sentences"}]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalOpenAIServer]:
    with LocalOpenAIServer(first_token_delay=0.01, token_interval=0.001, tokens=30) as srv:
        yield srv


@pytest.fixture
def env(server: LocalOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> LocalOpenAIServer:
    """``openai.OpenAI()`` / ``openai.AsyncOpenAI()`` in the snippets reach the local server."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    return server


@pytest.fixture(scope="module")
def expected_text(server: LocalOpenAIServer) -> str:
    """What gpt-4o answers (the local server is deterministic per prompt), fetched directly."""
    client = openai.OpenAI(base_url=server.base_url, api_key="x")
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _run(source: str, namespace: dict[str, Any] | None = None, backend: str = "asyncio") -> None:
    """Execute a snippet like a script; top-level ``await`` / ``async for`` run under anyio."""
    namespace = {"__name__": "__snippet__"} if namespace is None else namespace
    code = compile(source, "<snippet>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if result is not None:  # a coroutine: the snippet awaits at top level

        async def main() -> None:
            await result

        anyio.run(main, backend=backend)


def test_page_sync_snippet(
    env: LocalOpenAIServer, expected_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = env.request_count
    _run(PAGE_SYNC)
    out = capsys.readouterr().out
    assert out == f"{expected_text}\n{expected_text}"
    assert env.request_count - before == 1  # the second call was a cache hit


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_page_async_snippet(
    env: LocalOpenAIServer, expected_text: str, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    # The page's context: the sync snippet's setup, with the client the async snippet needs.
    setup = PAGE_SYNC.split("# First call")[0].replace(
        "client = openai.OpenAI()", "client = openai.AsyncOpenAI()"
    )
    snippet = PAGE_ASYNC.replace(
        "create(..., stream=True)", 'create(model="gpt-4o", messages=messages, stream=True)'
    )
    assert snippet != PAGE_ASYNC
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    _run(setup, namespace)
    before = env.request_count
    # miss, then hit, in one event loop (as one script would), then close the client there:
    # an unclosed AsyncOpenAI schedules its aclose on whatever asyncio loop runs when it is
    # collected (a later test's), with this loop's (maybe trio's) connections
    _run(f"{snippet}\nprint()\n{snippet}\nawait client.close()\n", namespace, backend=backend)
    out = capsys.readouterr().out
    assert out == f"{expected_text}\n{expected_text}"
    assert env.request_count - before == 1


def test_page_chunk_joiner_snippet(
    env: LocalOpenAIServer, expected_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = PAGE_SYNC.split("# First call")[0]
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    _run(setup + PAGE_CHUNK_JOINER, namespace)
    stream_cache = namespace["stream_cache"]
    stream_fn = namespace["stream_fn"]

    before = env.request_count
    live = list(stream_cache.get_or_stream(MESSAGES, stream_fn, model_id="gpt-4o"))
    assert "".join(c.choices[0].delta.content or "" for c in live) == expected_text
    assert env.request_count - before == 1

    replayed = list(stream_cache.get_or_stream(MESSAGES, stream_fn, model_id="gpt-4o"))
    assert env.request_count - before == 1  # a hit
    # The joiner stored the text; the hit carries exactly that text.
    text = "".join(
        r if isinstance(r, str) else (r.choices[0].delta.content or "" if r.choices else "")
        for r in replayed
    )
    assert text == expected_text
    stats = stream_cache.stats()
    assert stats["stores"] == 1
    assert stats["hits"] == 1
    assert capsys.readouterr().out == ""


def _readme_first_python_block() -> str | None:
    readme = ROOT / "README.md"
    if not readme.exists():
        return None
    match = re.search(r"^```python[ \t]*\n(.*?)^```", readme.read_text(), re.M | re.S)
    return match.group(1) if match else None


def test_readme_first_example(
    env: LocalOpenAIServer, expected_text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _readme_first_python_block()
    assert source is not None, "README.md must open with a ```python example"
    before = env.request_count
    _run(source)
    out = capsys.readouterr().out
    assert env.request_count - before == 1
    if source.strip() == PAGE_SYNC.strip():
        assert out == f"{expected_text}\n{expected_text}"
    else:  # another example: it must at least print the streamed answer
        assert expected_text in out


# -- README.md: every python block, and the ones that are whole programs run as written --------


def _readme_blocks() -> list[tuple[str, str]]:
    """(the heading above it, the code) of every ```python block of README.md."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    heading = ""
    for match in re.finditer(r"^(#{1,6} [^\n]*)$|^```python[ \t]*\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("#").strip()
        else:
            blocks.append((heading, match.group(2)))
    return blocks


def _readme_block(heading: str) -> str:
    found = [code for h, code in _readme_blocks() if h.startswith(heading)]
    assert len(found) == 1, f"one ```python block under {heading!r} in README.md"
    return found[0]


def test_every_readme_python_block_is_valid_python() -> None:
    blocks = _readme_blocks()
    assert len(blocks) >= 5
    for heading, code in blocks:
        try:
            ast.parse(code)
        except SyntaxError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"README block under {heading!r} does not parse: {exc}")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_readme_async_example_runs_as_written(
    env: LocalOpenAIServer, expected_text: str, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    """The "Async" section's example is a whole program: run as a script, it streams live,
    then replays; on trio through the line its last comment gives."""
    source = _readme_block("Async, on asyncio and trio")
    last = source.rstrip().splitlines()[-1]
    assert last == "asyncio.run(main())  # on trio: trio.run(main)"
    if backend == "trio":
        source = source.replace(last, "import trio\ntrio.run(main)")
    before = env.request_count
    exec(compile(source, "<README async example>", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == f"{expected_text}\n{expected_text}\n"
    assert env.request_count - before == 1  # the second pass was a hit


def test_readme_fastapi_recipe_is_the_tested_example() -> None:
    """The README's recipe is the handler of examples/fastapi_app.py, verbatim (that file is
    what tests/e2e/test_fastapi_recipe.py serves under uvicorn)."""
    block = _readme_block("Serving streams: FastAPI and server-sent events")
    example = (ROOT / "examples" / "fastapi_app.py").read_text()
    assert block.strip() in example
    assert "text/event-stream" in block and "aclosing(" in block
