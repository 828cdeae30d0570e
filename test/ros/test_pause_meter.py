"""The test helper that discounts machine pauses from timing bounds counts a pause, and nothing else."""

from __future__ import annotations

import time
from typing import Tuple

from ros_helpers import PauseMeter


def _idle() -> float:
    with PauseMeter() as meter:
        time.sleep(0.3)  # the meter's thread runs throughout
    return meter.paused_s


def _gil_held() -> Tuple[float, float]:
    with PauseMeter() as meter:
        time.sleep(0.05)
        started = time.monotonic()
        sum(range(20_000_000))  # one C call that keeps the GIL: the meter's thread cannot run, as in a pause
        holding_s = time.monotonic() - started
        time.sleep(0.05)
    return holding_s, meter.paused_s


def test_the_pause_meter_counts_a_stretch_when_its_thread_cannot_run_and_not_a_sleep():
    # Three tries each: a real pause of the machine may land in one of them (that is what the meter is for).
    assert min(_idle() for _ in range(3)) < 0.1
    held = [_gil_held() for _ in range(3)]
    assert all(holding_s > 0.2 for holding_s, _ in held), f"the GIL was not held long enough to test anything: {held}"
    assert any(0.5 * holding_s <= paused_s <= holding_s + 0.05 for holding_s, paused_s in held), held
