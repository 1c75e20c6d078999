"""The demo: a local OpenAI-compatible server and ``python -m chengeta_ai demo``.

`chengeta_ai.demo.server.LocalOpenAIServer` is importable without the ``openai`` package; the
demo itself (`chengeta_ai.demo.cli`) needs it.
"""

from chengeta_ai.demo.server import LocalOpenAIServer

__all__ = ["LocalOpenAIServer"]
