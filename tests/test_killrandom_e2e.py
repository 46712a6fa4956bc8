"""A few SIGKILLs of the daemon at random instants (the full run is `./dev killrandom`, see killrandom.py)."""

from __future__ import annotations

import os
import random

import pytest

from harness import wait_for
from killrandom import KillRandom

pytestmark = pytest.mark.e2e

KILLS = int(os.environ.get("PROTO4D_KILLRANDOM", "3"))


@pytest.mark.long
def test_random_kills_always_come_back_to_one_verified_release(tmp_path):
    seed = int(os.environ.get("PROTO4D_KILLRANDOM_SEED") or random.randrange(1 << 30))
    lines: list[str] = []
    kr = KillRandom(tmp_path, seed, log=lines.append)
    try:
        result = kr.run(KILLS, stop_on_failure=True)
    finally:
        kr.close()
    assert not result.failures, f"reproduce with PROTO4D_KILLRANDOM_SEED={seed}:\n" + "\n".join(lines)
    assert len(result.cycles) == KILLS
    wait_for(lambda: not kr.d.app_pids(), 10, "no app process after the run")
