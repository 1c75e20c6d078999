"""The codec fuzz target (`tests/codec_fuzz_child.py`) under a 1 GiB address-space cap.

It runs in a child process so that an abort (a failed allocation) or a crash fails this test
rather than the test run; hypothesis drives random bytes, mutations of valid encodings that
inflate counts and lengths, and zstd frames declaring or producing huge bodies.
"""

from __future__ import annotations

import subprocess
import sys

MEMORY_CAP = 2**30
EXAMPLES = 400  # per strategy; ~20-30 s in all


def test_fuzz_decoding_under_a_memory_cap() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.codec_fuzz_child", str(MEMORY_CAP), str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.returncode,
        result.stdout[-3000:],
        result.stderr[-3000:],
    )
