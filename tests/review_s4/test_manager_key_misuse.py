"""Review s4, finding: ``CacheManager.set`` with a key that is not a ``str`` fails with an
internal ``AttributeError`` (LOW).

``manager.set(5, value)`` (or a ``bytes``/``None``/tuple key) raises ``AttributeError: 'int'
object has no attribute 'startswith'`` (or ``TypeError: startswith first arg must be bytes``)
from the namespace-scoping code, on every backend: neither a clear ``TypeError`` naming the
``key`` argument (as the other misuses get) nor the fail-open a write promises ("Reads and
writes fail open"). ``aset`` likewise.

Fix direction: check ``key`` (a non-empty ``str``) at the top of ``set``/``get``/``delete``/
``exists`` and their async twins, with a ``TypeError`` saying so.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from chengeta_ai import CacheManager

KEYS = {"int": 5, "bytes": b"k", "none": None, "tuple": ("a",)}


@pytest.mark.parametrize("key", list(KEYS.values()), ids=list(KEYS))
def test_set_with_a_non_str_key_is_a_clear_type_error(key: Any) -> None:
    # observed on main: AttributeError: 'int' object has no attribute 'startswith'
    with pytest.raises(TypeError, match="key"):
        CacheManager().set(key, "value")


@pytest.mark.anyio
async def test_aset_with_a_non_str_key_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="key"):
        await CacheManager().aset(5, "value")  # type: ignore[arg-type]
    await anyio.lowlevel.checkpoint()
