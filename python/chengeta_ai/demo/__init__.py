"""The demo: a local upstream speaking the OpenAI and Anthropic APIs, and ``python -m chengeta_ai
demo``.

- `chengeta_ai.demo.server`: `LocalOpenAIServer`, uvicorn in a background thread on loopback;
- `chengeta_ai.demo.app`: the Starlette app (routes, pacing, failure injection);
- `chengeta_ai.demo.apis`: the wire formats (pure functions);
- `chengeta_ai.demo.cli`: the demo command.

`LocalOpenAIServer` imports without Starlette, uvicorn or ``openai``; starting it needs the
first two, the demo needs all three (the ``demo`` extra).
"""

from chengeta_ai.demo.server import LocalOpenAIServer

__all__ = ["LocalOpenAIServer"]
