"""The ``chengeta-ai`` command (also ``python -m chengeta_ai``).

Options:
    --version   print "chengeta_ai <version>" and exit

Subcommands:
    demo    stream one prompt twice through StreamingResponseCache (see ``demo --help``)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chengeta-ai`` console script; returns the exit code."""
    from chengeta_ai import __version__
    from chengeta_ai.demo import cli

    parser = argparse.ArgumentParser(
        prog="chengeta-ai", description="chengeta_ai: cache for streamed LLM responses."
    )
    parser.add_argument("--version", action="version", version=f"chengeta_ai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="stream one prompt twice through the cache (a local server unless --real)",
        description=cli.__doc__.split("\n\n")[0] if cli.__doc__ else None,
    )
    cli.add_arguments(demo)
    demo.set_defaults(func=cli.run)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
