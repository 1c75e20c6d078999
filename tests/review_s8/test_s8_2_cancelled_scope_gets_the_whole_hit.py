"""Finding S8-2 (low, regression of s8-hit): a consumer whose scope is already cancelled (a
deadline that has passed, ``CancelScope.cancel()`` called by itself or by another task before it
reads) gets every chunk of a hit that replays within a slice before `Cancelled` reaches it.
The branch checks the clock at a batch's end and only turns after `REPLAY_SLICE`, so the only
cancel point of a short hit is the final checkpoint, after the last chunk; on main the end of
the first (one-chunk) batch was one, so such a consumer got one chunk. Measured on a 130-chunk
entry, cancelled before the first read: the branch hands out all 130 chunks, main one, on
asyncio and trio. A consumer with side effects per chunk (writing to a sync sink, counting
tokens, billing) does the whole stream's work after its deadline. Cache state stays right
(outcome "abandoned", ``chunks_replayed`` equal to the chunks handed out, on both). A cancel
landing mid-hit reaches the consumer within a slice: as designed, not part of this finding.
Fails on main: no (main hands out one chunk, which this test allows; see S8-3 for that one).

Suggested fix: the one of S8-1 (an unconditional turn at the end of the first batch instead of
after the last) restores main's behaviour here too.
"""

from __future__ import annotations

import anyio
import pytest
from tests.review_s8.hits import cache_for, never, stored

pytestmark = [
    pytest.mark.anyio,
]

N = 130  # three batches (1 + 64 + 64 + 1): replayed within one slice


async def test_a_passed_deadline_stops_a_hit_at_the_first_batch() -> None:
    cache = cache_for()
    messages = [{"role": "user", "content": "late"}]
    await stored(cache, messages, N)
    got = 0
    stream = cache.aget_or_stream(messages, never)
    with anyio.CancelScope() as scope:
        scope.cancel()  # as a deadline that has passed
        async for _ in stream:
            got += 1  # never awaits anything of its own
    assert scope.cancelled_caught
    info = stream.cache_info
    assert info is not None and (info.status, info.outcome) == ("hit", "abandoned")
    assert cache.stats()["chunks_replayed"] == got
    assert got <= 1, got  # main: 1 (the first batch), branch: all 130
