"""The test helper that discounts machine pauses from timing bounds counts a pause, and nothing else."""

from __future__ import annotations

import time

from ros_helpers import PauseMeter


def test_the_pause_meter_counts_a_stretch_when_its_thread_cannot_run_and_not_a_sleep():
    with PauseMeter() as idle:
        time.sleep(0.3)  # the meter's thread runs throughout
    assert idle.paused_s < 0.1

    with PauseMeter() as held:
        time.sleep(0.05)
        started = time.monotonic()
        sum(range(20_000_000))  # one C call that keeps the GIL: the meter's thread cannot run, as in a pause
        holding_s = time.monotonic() - started
        time.sleep(0.05)
    assert holding_s > 0.2, "the GIL was not held long enough to test anything"
    assert 0.5 * holding_s <= held.paused_s <= holding_s + 0.05
