"""SideOutputs: markers and overlay built off the forecast worker, newest job first; nothing is timed."""

from __future__ import annotations

import threading

from traj_forecast_ros.ros.outputs import SideOutputs


def test_jobs_run_off_the_caller_thread_and_a_waiting_job_is_replaced() -> None:
    side = SideOutputs()
    release, started = threading.Event(), threading.Event()
    ran = []

    def blocking() -> None:
        ran.append(("first", threading.current_thread().name))
        started.set()
        release.wait(30)

    side.submit(blocking)
    assert started.wait(30)
    side.submit(lambda: ran.append(("stale", None)))  # waits behind the running job ...
    side.submit(lambda: ran.append(("newest", None)))  # ... and is replaced by this one
    release.set()
    assert side.idle(30)
    assert [name for name, _ in ran] == ["first", "newest"]
    assert ran[0][1] == "forecast_side_outputs" != threading.current_thread().name
    assert side.skipped == 1 and side.done == 2 and side.failed == 0
    assert side.stop(30)


def test_a_failing_job_is_reported_and_the_thread_keeps_going() -> None:
    errors = []
    side = SideOutputs(on_error=errors.append)
    side.submit(lambda: 1 / 0)
    assert side.idle(30)
    done = threading.Event()
    side.submit(done.set)
    assert done.wait(30) and side.idle(30)
    assert side.failed == 1 and side.done == 1 and isinstance(errors[0], ZeroDivisionError)
    assert side.stop(30)


def test_stop_drops_the_waiting_job_and_submit_restarts() -> None:
    side = SideOutputs()
    release, started = threading.Event(), threading.Event()
    ran = []
    side.submit(lambda: (started.set(), release.wait(30), ran.append("running")))
    assert started.wait(30)
    side.submit(lambda: ran.append("dropped"))
    assert not side.stop(0)  # drops the waiting job; the running one is still busy
    release.set()
    assert side.stop(30)
    assert ran == ["running"] and side.skipped == 1
    side.submit(lambda: ran.append("after restart"))
    assert side.idle(30) and ran == ["running", "after restart"]
    assert side.stop(30)
