"""``python -m chengeta_ai demo``: one prompt streamed twice through `StreamingResponseCache`.

Without ``--real`` (or without ``OPENAI_API_KEY``) the demo starts a `LocalOpenAIServer` on
loopback (Starlette + uvicorn, the ``demo`` extra) and talks to it with the real ``openai``
client over HTTP, so it needs no key and no network.
It streams the prompt twice with ``openai.OpenAI`` + ``get_or_stream`` (a miss, then a hit),
then twice with ``openai.AsyncOpenAI`` + ``aget_or_stream`` under anyio (asyncio or trio), and
prints what it measured: time to the first chunk, total time, upstream calls, bytes stored.

The default backend is a SQLite file that persists across runs, at
`chengeta_ai.backends.sqlite_backend.default_cache_path()` (``--sqlite-path`` to choose another).
The demo's entries carry their own tag (`DEMO_TAG`), and each of the two runs starts with
``manager.invalidate(DEMO_TAG)``: only the demo's own entries are dropped, so each run shows a
miss and then a hit while anything else in the file is left alone.
Storage backends (`--backend memory|sqlite|redis`) are built by the factories in `BACKENDS`;
add one there to offer it on the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from chengeta_ai.demo.server import LocalOpenAIServer

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

__all__ = ["BACKENDS", "DEMO_TAG", "add_arguments", "run"]

DEFAULT_PROMPT = "Explain caching in 3 sentences"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BACKEND = "sqlite"
#: The tag on every entry the demo stores; each run drops the entries carrying it, and only them.
DEMO_TAG = "chengeta-demo"


# -- storage backends ------------------------------------------------------------------------


class DemoError(Exception):
    """A setup problem to report in one line (exit code 2), e.g. an unreachable Redis."""


def _memory_backend(args: argparse.Namespace, workdir: str, name: str, stack: ExitStack) -> Any:
    from chengeta_ai import InMemoryBackend

    return InMemoryBackend()


def _sqlite_path(args: argparse.Namespace) -> str:
    """The demo's SQLite file: ``--sqlite-path``, else the user's cache file (absolute)."""
    from chengeta_ai.backends.sqlite_backend import default_cache_path

    path = os.path.expanduser(args.sqlite_path) if args.sqlite_path else default_cache_path()
    return os.path.abspath(path)


def _sqlite_backend(args: argparse.Namespace, workdir: str, name: str, stack: ExitStack) -> Any:
    from chengeta_ai.backends.sqlite_backend import SQLiteBackend
    from chengeta_ai.errors import BackendError

    # A file kept across runs (and maybe shared with other programs): the demo never clears it,
    # it only drops its own entries (DEMO_TAG) before each run.
    path = _sqlite_path(args)
    backend = SQLiteBackend(path)
    stack.callback(backend.close)
    try:
        backend.exists("probe")  # opening is lazy: fail here, in one line, not mid-stream
    except (BackendError, OSError) as exc:
        raise DemoError(f"cannot open the SQLite cache at {path}: {exc}") from exc
    return backend


def _redis_backend(args: argparse.Namespace, workdir: str, name: str, stack: ExitStack) -> Any:
    from chengeta_ai.backends.redis_backend import RedisBackend
    from chengeta_ai.errors import BackendError

    # A namespace of its own, emptied at exit: the demo never touches other keys.
    prefix = f"chengeta-demo:{uuid.uuid4().hex[:12]}:{name}:"
    backend = RedisBackend(args.redis_url, prefix=prefix)
    stack.callback(backend.close)
    try:
        backend.exists("probe")
    except BackendError as exc:
        raise DemoError(f"cannot reach Redis at {args.redis_url}: {exc}") from exc
    stack.callback(backend.clear)
    return backend


#: ``--backend`` choices: name -> (description, factory). A factory is called once per demo run
#: (sync, async) with ``(args, workdir, run_name, exit_stack)`` (``workdir``: a scratch
#: directory deleted at exit), returns a backend and registers its cleanup on the exit stack.
#: The backend need not be empty: the demo drops its own entries (`DEMO_TAG`) before each run.
BACKENDS: dict[str, tuple[str, Callable[[argparse.Namespace, str, str, ExitStack], Any]]] = {
    "memory": ("InMemoryBackend (process memory)", _memory_backend),
    "sqlite": ("SQLiteBackend (a file kept across runs)", _sqlite_backend),
    "redis": ("RedisBackend (a fresh key prefix, cleared at exit)", _redis_backend),
}


# -- measurements ----------------------------------------------------------------------------


@dataclass
class Pass:
    """One call through the cache: what it printed and how long it took."""

    label: str
    first_chunk: float | None = None
    total: float = 0.0
    chunks: int = 0
    upstream_calls: int = 0
    served_by: str = "?"
    text: str = ""


@dataclass
class Report:
    title: str
    passes: list[Pass] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    upstream_total: int = 0


class _Clock:
    """Times one pass and prints its text live, wrapped under the label."""

    def __init__(self, p: Pass, out: TextIO, indent: int, width: int) -> None:
        self.p = p
        self.out = out
        self.indent = indent
        self.width = width
        self.column = indent
        self.t0 = time.perf_counter()

    def chunk(self, chunk: Any) -> None:
        if self.p.first_chunk is None:
            self.p.first_chunk = time.perf_counter() - self.t0
        self.p.chunks += 1
        text = _content(chunk)
        self.p.text += text
        if not text:
            return
        if self.column + len(text) > self.width and self.column > self.indent:
            self.out.write("\n" + " " * self.indent)
            self.column = self.indent
            text = text.lstrip(" ")
        self.out.write(text)
        self.out.flush()
        self.column += len(text)

    def done(self) -> None:
        self.p.total = time.perf_counter() - self.t0
        self.out.write("\n")


def _start_pass(p: Pass, out: TextIO) -> _Clock:
    prefix = f"  {p.label:<4} | "
    out.write(prefix)
    out.flush()
    width = min(shutil.get_terminal_size((100, 24)).columns, 100) - 1
    return _Clock(p, out, len(prefix), max(width, len(prefix) + 20))


def _content(chunk: Any) -> str:
    choices = getattr(chunk, "choices", None)
    if not choices:
        return ""  # the usage chunk
    return choices[0].delta.content or ""


# -- the demo --------------------------------------------------------------------------------


@dataclass
class Upstream:
    """Where the completions come from, and how to count the calls made to it."""

    description: str
    base_url: str | None
    api_key: str | None
    count: Callable[[], int]
    calls: int = 0  # stream_fn invocations, counted by the demo itself


def _new_cache(args: argparse.Namespace, workdir: str, name: str, stack: ExitStack) -> Any:
    from chengeta_ai import CacheKeyBuilder, CacheManager
    from chengeta_ai.layers.streaming_cache import StreamingResponseCache

    backend = BACKENDS[args.backend][1](args, workdir, name, stack)
    manager = CacheManager(backend=backend, key_builder=CacheKeyBuilder())
    return StreamingResponseCache(manager)


def _tags(args: argparse.Namespace) -> list[str]:
    """The demo's tag, plus the ``model:<id>`` tag the cache gives entries by default."""
    return [DEMO_TAG, f"model:{args.model}"]


def _drop_demo_entries(cache: Any) -> int:
    """``manager.invalidate(DEMO_TAG)``: drops the entries earlier demo runs left, only them."""
    from chengeta_ai.errors import BackendError

    try:
        return int(cache.manager.invalidate(DEMO_TAG))
    except BackendError as exc:
        raise DemoError(f"cannot drop the demo's earlier entries: {exc}") from exc


def _run_sync(args: argparse.Namespace, upstream: Upstream, cache: Any, out: TextIO) -> Report:
    import openai

    client = openai.OpenAI(base_url=upstream.base_url, api_key=upstream.api_key)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": args.prompt}]

    def stream_fn(messages: list[ChatCompletionMessageParam]) -> Any:
        upstream.calls += 1
        return client.chat.completions.create(model=args.model, messages=messages, stream=True)

    report = Report("sync: openai.OpenAI + StreamingResponseCache.get_or_stream")
    start_count = upstream.count()
    try:
        for label in ("MISS", "HIT"):
            p = Pass(label)
            stats_before = cache.stats()
            before = upstream.count()
            clock = _start_pass(p, out)
            for chunk in cache.get_or_stream(
                messages, stream_fn, model_id=args.model, tags=_tags(args)
            ):
                clock.chunk(chunk)
            clock.done()
            p.upstream_calls = upstream.count() - before
            p.served_by = _served_by(stats_before, cache.stats())
            report.passes.append(p)
    finally:
        client.close()
    report.stats = dict(cache.stats())
    report.upstream_total = upstream.count() - start_count
    return report


def _run_async(args: argparse.Namespace, upstream: Upstream, cache: Any, out: TextIO) -> Report:
    import anyio
    import openai

    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": args.prompt}]
    report = Report(
        f"async ({args.async_backend}): openai.AsyncOpenAI + StreamingResponseCache.aget_or_stream"
    )

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key=upstream.api_key) as c:

            async def async_stream_fn(messages: list[ChatCompletionMessageParam]) -> Any:
                upstream.calls += 1
                async for chunk in await c.chat.completions.create(
                    model=args.model, messages=messages, stream=True
                ):
                    yield chunk

            start_count = upstream.count()
            for label in ("MISS", "HIT"):
                p = Pass(label)
                stats_before = cache.stats()
                before = upstream.count()
                clock = _start_pass(p, out)
                async for chunk in cache.aget_or_stream(
                    messages, async_stream_fn, model_id=args.model, tags=_tags(args)
                ):
                    clock.chunk(chunk)
                clock.done()
                p.upstream_calls = upstream.count() - before
                p.served_by = _served_by(stats_before, cache.stats())
                report.passes.append(p)
            report.upstream_total = upstream.count() - start_count

    anyio.run(main, backend=args.async_backend)
    report.stats = dict(cache.stats())
    return report


def _served_by(before: dict[str, Any], after: dict[str, Any]) -> str:
    """How the cache says it served a call, from its counters (not from our expectation)."""
    ways = [
        ("misses", "upstream"),
        ("hits", "stored entry"),
        ("joins", "in-flight stream"),  # the first call's store was still being written
    ]
    got = [text for key, text in ways if after.get(key, 0) - before.get(key, 0) > 0]
    return " + ".join(got) or "?"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _print_report(report: Report, upstream: Upstream, out: TextIO) -> list[str]:
    """Print the table; return the problems found (an empty list when all is as expected)."""
    rows = [("", "first chunk", "total", "upstream calls", "chunks", "served from")]
    for p in report.passes:
        rows.append(
            (
                p.label,
                _ms(p.first_chunk),
                _ms(p.total),
                str(p.upstream_calls),
                str(p.chunks),
                p.served_by,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out.write("\n")
    for r in rows:
        out.write(
            "  "
            + "  ".join(
                c.rjust(w) if 0 < i < len(r) - 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            + "\n"
        )
    miss, hit = report.passes
    if miss.first_chunk and hit.first_chunk and hit.total > 0:
        out.write(
            f"  hit vs miss: first chunk {miss.first_chunk / hit.first_chunk:,.0f}x sooner, "
            f"whole stream {miss.total / hit.total:,.0f}x faster\n"
        )
    stored_bytes = report.stats.get("stored_bytes")
    stored_chunks = report.stats.get("stored_chunks")
    if isinstance(stored_bytes, int) and isinstance(stored_chunks, int) and stored_chunks:
        out.write(
            f"  stored: {stored_bytes:,} bytes for {stored_chunks} chunks "
            f"({stored_bytes / stored_chunks:,.1f} bytes/chunk)\n"
        )
    else:
        out.write(
            f"  stored: nothing yet according to cache.stats() (stored_bytes={stored_bytes!r},"
            f" stored_chunks={stored_chunks!r})\n"
        )
    out.write(
        f"  cache.stats(): hits={report.stats.get('hits')} joins={report.stats.get('joins')}"
        f" misses={report.stats.get('misses')} stores={report.stats.get('stores')};"
        f" upstream calls in all: {report.upstream_total}\n"
    )

    problems = []
    if (miss.upstream_calls, hit.upstream_calls) != (1, 0):
        problems.append(
            f"{report.title}: expected 1 upstream call then 0, got "
            f"{miss.upstream_calls} then {hit.upstream_calls}"
        )
    if miss.text != hit.text or miss.chunks != hit.chunks:
        problems.append(f"{report.title}: the hit did not replay the miss")
    return problems


@contextmanager
def _upstream(args: argparse.Namespace, out: TextIO) -> Iterator[Upstream]:
    if args.real:
        # The real API cannot be asked how often it was called: count the stream_fn calls.
        url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        real = Upstream(f"the OpenAI API at {url} (OPENAI_API_KEY)", None, None, lambda: real.calls)
        yield real
        return
    if args.fast:
        first, interval = 0.005, 0.0005
    else:
        first, interval = args.first_token_delay, args.token_interval
    with LocalOpenAIServer(
        first_token_delay=first, token_interval=interval, tokens=args.tokens
    ) as s:
        yield Upstream(
            f"local OpenAI-compatible server at {s.base_url} ({args.tokens} tokens, first after "
            f"{first * 1000:g} ms, then one every {interval * 1000:g} ms)",
            s.base_url,
            "local",
            lambda: s.request_count,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message to send")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model (default: %(default)s)")
    parser.add_argument(
        "--real",
        action="store_true",
        help="talk to the real OpenAI API (needs OPENAI_API_KEY); default: a local server",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=DEFAULT_BACKEND,
        help="cache storage backend (default: %(default)s, a file under the user's cache dir)",
    )
    parser.add_argument(
        "--sqlite-path",
        metavar="PATH",
        default=None,
        help="for --backend sqlite: the cache file (default: $XDG_CACHE_HOME or ~/.cache, "
        "then chengeta_ai/cache.sqlite3)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("CHENGETA_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="for --backend redis (default: $CHENGETA_REDIS_URL or %(default)s)",
    )
    parser.add_argument(
        "--async-backend",
        choices=["asyncio", "trio"],
        default="asyncio",
        help="event loop for the async run (default: %(default)s)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="local server with tiny delays (for smoke tests)"
    )
    parser.add_argument(
        "--tokens", type=int, default=60, help="local server: tokens per reply (default: 60)"
    )
    parser.add_argument(
        "--first-token-delay",
        type=float,
        default=0.25,
        help="local server: seconds before the first token (default: %(default)s)",
    )
    parser.add_argument(
        "--token-interval",
        type=float,
        default=0.02,
        help="local server: seconds between tokens (default: %(default)s)",
    )
    parser.add_argument("--sync-only", action="store_true", help="skip the async run")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the demo; returns the process exit code."""
    out = out if out is not None else sys.stdout
    has_key = bool(os.environ.get("OPENAI_API_KEY"))
    if args.real and not has_key:
        print("chengeta-ai demo: --real needs OPENAI_API_KEY in the environment", file=sys.stderr)
        return 2
    # the local upstream runs on Starlette + uvicorn; --real needs only the openai client
    needed = ["openai"] if args.real else ["openai", "starlette", "uvicorn"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"chengeta-ai demo: needs {', '.join(missing)}: pip install 'chengeta_ai[demo]'",
            file=sys.stderr,
        )
        return 2

    problems: list[str] = []
    with ExitStack() as stack:
        upstream = stack.enter_context(_upstream(args, out))
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="chengeta-demo-"))
        out.write("chengeta_ai demo: one prompt streamed twice through StreamingResponseCache\n")
        out.write(f"  upstream: {upstream.description}\n")
        if has_key and not args.real:
            out.write("  (OPENAI_API_KEY is set; pass --real to use the real API)\n")
        out.write(f"  model:    {args.model}\n")
        where = ""
        if args.backend == "redis":
            where = f" at {args.redis_url}"
        elif args.backend == "sqlite":
            where = f" at {_sqlite_path(args)}"
        out.write(f"  backend:  {BACKENDS[args.backend][0]}{where}\n")
        out.write(f"  prompt:   {args.prompt!r}\n")

        runs: list[tuple[str, Callable[..., Report]]] = [("sync", _run_sync)]
        if not args.sync_only:
            runs.append(("async", _run_async))
        for name, fn in runs:
            try:
                cache = _new_cache(args, workdir, name, stack)
                dropped = _drop_demo_entries(cache)
            except DemoError as exc:
                print(f"chengeta-ai demo: {exc}", file=sys.stderr)
                return 2
            out.write(f"\n[{name}] ")
            title = (
                "openai.OpenAI + get_or_stream"
                if name == "sync"
                else f"openai.AsyncOpenAI + aget_or_stream on {args.async_backend}"
            )
            out.write(title + "\n")
            out.write(
                f"  manager.invalidate({DEMO_TAG!r}) dropped {dropped} "
                f"entr{'y' if dropped == 1 else 'ies'} from earlier demo runs (only the demo's)\n"
            )
            report = fn(args, upstream, cache, out)
            problems += _print_report(report, upstream, out)

    out.write("\n")
    if problems:
        for problem in problems:
            out.write(f"UNEXPECTED: {problem}\n")
        return 1
    out.write("OK: each prompt went upstream once; the second call replayed it from the cache.\n")
    return 0
