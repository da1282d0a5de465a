"""A short soak (`make soak` runs the long one): a hundred freeze/thaw cycles through the real
shim and socket, MariaDB and a unit-based app under a steady write load, faults injected at
random (bench/soak_inside.py says which and what is checked after every cycle)."""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import Container

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak

CYCLES = 100


@pytest.fixture
def soaked(installed: Container) -> Iterator[tuple[dict, str]]:
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
    soak.prepare(installed)
    try:
        result = soak.run(installed, CYCLES, seed, progress=CYCLES)
        # -s shows it; a failure shows it in the assertion's message.
        summary = soak.figures(result)
        print(summary)
        yield result, summary
    finally:
        soak.cleanup(installed)


def test_a_hundred_cycles_with_faults_lose_no_write_leave_no_app_down_and_leak_nothing(soaked):
    result, summary = soaked
    assert result["failure"] is None, summary
    assert len(result["cycles"]) == CYCLES, summary
    assert result["acked_writes"] > CYCLES and result["lost_writes"] == [], summary
    kinds = Counter(record["fault"] for record in result["cycles"] if record["fault"])
    assert len(kinds) >= 5, summary  # the shuffled bag brings most kinds into a short run
    assert soak.flat(soak.resource_trend(result["cycles"])) == [], summary
