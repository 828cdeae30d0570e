"""Mailboxes, worker and statistics of the node, with a fake forecaster (no ROS, no DDS)."""

import threading
import time
from typing import Callable, List, Optional

import numpy as np
import pytest

from traj_forecast_ros.errors import ForecastCancelled, InvalidImageError
from traj_forecast_ros.ros.params import default_settings
from traj_forecast_ros.ros.pipeline import (
    FORECAST_FAILED,
    FUTURE_STAMP,
    OUT_OF_MEMORY,
    PUBLISH_FAILED,
    STOPPED,
    SUPERSEDED,
    TOO_OLD,
    ForecastPipeline,
    Frame,
    StatsBook,
    classify_error,
    reason_category,
)
from traj_forecast_ros.ros.scheduler import CameraMailboxes
from traj_forecast_ros.ros.stats import RateMeter, ReasonCounter, Window


class FakeForecaster:
    """``forecast_batch``: each image's first pixel after ``delay`` s per call; raises whatever is queued in
    ``fail_with``. ``one``: an optional per-image function instead (it may block or raise)."""

    def __init__(self, delay: float = 0.0, one: Optional[Callable[[np.ndarray], int]] = None) -> None:
        self.delay = delay
        self.one = one
        self.calls = 0
        self.batches: List[int] = []  # images per call
        self.options: List[dict] = []
        self.fail_with: List[BaseException] = []
        self.started = threading.Event()

    def forecast_batch(self, requests, num_samples=8, steps=None, cancel=None, max_pixels=None, **options):
        self.calls += 1
        self.batches.append(len(requests))
        self.options.append(dict(options, num_samples=num_samples, steps=steps, max_pixels=max_pixels))
        self.started.set()
        if self.fail_with:
            raise self.fail_with.pop(0)
        time.sleep(self.delay)
        if self.one is not None:
            return [self.one(request.image) for request in requests]
        return [int(request.image[0, 0, 0]) for request in requests]


class Recorder:
    def __init__(self) -> None:
        self.published: List[tuple] = []
        self.event = threading.Event()

    def __call__(self, frame: Frame, result: int, settings) -> None:
        self.published.append((frame.message, result))
        self.event.set()


def decode(message: int, max_pixels: int) -> np.ndarray:
    if message < 0:
        err = InvalidImageError("negative frame")
        err.reason = "truncated"
        raise err
    return np.full((2, 2, 3), message % 256, np.uint8)


SETTINGS = default_settings().updated({"max_input_age": 0.0, "max_clock_skew": 3600.0})


def frame(value: int, stamp: float = 0.0, camera: str = "", **changes) -> Frame:
    return Frame(message=value, stamp_s=stamp, settings=SETTINGS.updated(changes), camera=camera)


def make_pipeline(forecaster, recorder, clock=time.time, cameras=("",), **options):
    return ForecastPipeline(forecaster, recorder, clock=clock, cameras=cameras, decoders={"raw": decode}, **options)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_mailbox_keeps_only_the_newest_item():
    box: CameraMailboxes[int] = CameraMailboxes()
    assert box.put("", 1) is False
    assert box.put("", 2) is True  # 1 superseded
    assert len(box) == 1
    assert box.take(timeout=0) == [2]
    assert box.take(timeout=0.01) == []
    box.put("", 3)
    box.close()
    assert box.take(timeout=1) == []


def test_mailbox_take_wakes_on_put_and_close():
    box: CameraMailboxes[int] = CameraMailboxes()
    got = []
    taker = threading.Thread(target=lambda: got.append(box.take(timeout=30)))
    taker.start()
    time.sleep(0.05)
    box.put("", 7)
    taker.join(10)
    assert got == [[7]]
    taker = threading.Thread(target=lambda: got.append(box.take(timeout=30)))
    taker.start()
    started = time.monotonic()
    box.close()
    taker.join(10)
    assert got == [[7], []] and time.monotonic() - started < 10  # woken by close, not by its 30 s timeout


def test_worker_serves_the_newest_frame_and_counts_superseded():
    forecaster, recorder = FakeForecaster(delay=0.2), Recorder()
    pipeline = make_pipeline(forecaster, recorder)
    pipeline.start()
    pipeline.submit(frame(1))
    assert forecaster.started.wait(2)  # the worker is busy with frame 1
    for value in range(2, 12):  # a burst while busy: only the last one survives
        pipeline.submit(frame(value))
    assert wait_until(lambda: len(recorder.published) == 2)
    assert pipeline.stop(timeout=2)
    assert [m for m, _ in recorder.published] == [1, 11]
    assert recorder.published[1][1] == 11  # the forecaster saw the decoded newest frame
    stats = pipeline.stats.total.snapshot()
    assert stats["not_forecast"] == {SUPERSEDED: 9}
    assert stats["received"] == 11 and stats["published"] == 2
    # Measured, in seconds: at least the fake's 0.2 s; more only if the machine paused (it can, for up to 0.8 s).
    assert 0.19 <= stats["inference_p50_s"] < 2.0


def test_old_frames_are_dropped_by_stamp():
    now = [100.0]
    forecaster, recorder = FakeForecaster(), Recorder()
    pipeline = make_pipeline(forecaster, recorder, clock=lambda: now[0])
    assert pipeline.process([frame(1, stamp=99.0, max_input_age=0.5)]) == 0
    assert pipeline.process([frame(2, stamp=99.8, max_input_age=0.5)]) == 1
    assert pipeline.process([frame(3, stamp=0.0, max_input_age=0.5)]) == 1  # unstamped: age unknown, not dropped
    assert pipeline.process([frame(4, stamp=10.0, max_input_age=0.0)]) == 1  # 0 disables the check
    assert pipeline.stats.total.not_forecast.counts() == {TOO_OLD: 1}
    assert forecaster.calls == 3
    assert pipeline.stats.total.stamp_age.percentile(50) == pytest.approx((0.2 + 90.0) / 2)


def test_failures_are_counted_by_reason_and_the_worker_goes_on():
    class FakeCudaOOM(RuntimeError):
        pass

    FakeCudaOOM.__name__ = "OutOfMemoryError"  # what torch.cuda.OutOfMemoryError is called
    forecaster, recorder = FakeForecaster(), Recorder()
    forecaster.fail_with = [FakeCudaOOM("CUDA out of memory"), MemoryError(), RuntimeError("boom")]
    pipeline = make_pipeline(forecaster, recorder)
    pipeline.start()
    for value in (-1, 1, 2, 3, 4):  # bad image, OOM, MemoryError, RuntimeError, then a good frame
        pipeline.submit(frame(value))
        assert wait_until(lambda: pipeline.waiting == 0 and not pipeline.busy)
    assert wait_until(lambda: len(recorder.published) == 1)
    assert recorder.published == [(4, 4)]
    assert pipeline.stats.total.not_forecast.counts() == {"truncated": 1, OUT_OF_MEMORY: 2, FORECAST_FAILED: 1}
    assert pipeline.stop(timeout=2)


def test_publish_failure_is_counted():
    def broken_publish(*_):
        raise RuntimeError("context shut down")

    pipeline = make_pipeline(FakeForecaster(), broken_publish)
    assert pipeline.process([frame(1)]) == 0
    assert pipeline.stats.total.not_forecast.counts() == {PUBLISH_FAILED: 1}
    assert pipeline.stats.total.published == 0


def test_stop_during_inference_returns_quickly_and_discards_the_result():
    forecaster, recorder = FakeForecaster(delay=1.0), Recorder()
    pipeline = make_pipeline(forecaster, recorder)
    pipeline.start()
    pipeline.submit(frame(1))
    assert forecaster.started.wait(2)
    started = time.monotonic()
    assert pipeline.stop(timeout=0.2) is False  # still inside the 1 s forecast; stop() does not block on it
    assert time.monotonic() - started < 0.8  # 0.2 s, with room for a pause of the machine; the forecast takes 1 s
    pipeline.submit(frame(2))  # ignored once stopped
    assert wait_until(lambda: not pipeline.running, timeout=5)
    assert recorder.published == []


def test_idle_worker_stops_at_once():
    pipeline = make_pipeline(FakeForecaster(), Recorder())
    pipeline.start()
    started = time.monotonic()
    assert pipeline.stop(timeout=2)
    assert time.monotonic() - started < 1.0  # well within the 2 s timeout, with room for a pause of the machine


def test_logging_is_throttled_per_reason():
    counter = ReasonCounter(log_interval_s=5.0)
    assert counter.add("truncated", now=0.0) is True
    assert counter.add("truncated", now=1.0) is False
    assert counter.add("empty", now=1.0) is True  # another reason logs independently
    assert counter.add("truncated", now=6.0) is True
    assert counter.counts() == {"truncated": 3, "empty": 1} and counter.total() == 4


def test_rate_meter_and_window_are_bounded():
    meter = RateMeter(window_s=2.0, max_events=50)
    for i in range(200):
        meter.tick(now=i * 0.1)  # 10 Hz for 20 s
    assert meter.rate(now=19.9) == pytest.approx(10.0, rel=0.05)
    assert meter.period() == pytest.approx(0.1)
    assert len(meter._times) == 50
    assert meter.rate(now=100.0) == 0.0  # nothing recent
    window = Window(size=10)
    for value in range(100):
        window.add(value)
    assert len(window) == 10
    assert window.percentile(50) == pytest.approx(94.5)
    assert Window().percentile(95) is None


def test_forecast_rate_exceeds_input_rate_by_at_most_the_frames_in_flight():
    """Both meters count events in the same window. A frame received just before the window but forecast inside
    it counts only for the forecasts, so near the end of a stream the forecast rate runs ahead of the input rate,
    by at most the frames in flight (two per camera: its mailbox and the worker) over the window."""
    inputs, forecasts = RateMeter(window_s=5.0, started=0.0), RateMeter(window_s=5.0, started=0.0)
    for i in range(40):  # 4 Hz for 10 s; each forecast 0.45 s after its frame (under two frame periods)
        inputs.tick(now=0.25 * i)
        forecasts.tick(now=0.25 * i + 0.45)
    now = 10.2  # the stream has ended, its last forecasts are in
    assert forecasts.rate(now=now) > inputs.rate(now=now)
    assert forecasts.rate(now=now) <= inputs.rate(now=now) + 2 / 5.0


def test_classify_error():
    err = InvalidImageError("plain")
    assert classify_error(err) == "invalid_image"
    assert classify_error(MemoryError()) == OUT_OF_MEMORY
    assert classify_error(ValueError("x")) == FORECAST_FAILED


def test_reasons_fall_into_dropped_rejected_and_failed():
    assert reason_category(SUPERSEDED) == reason_category(TOO_OLD) == "dropped"
    assert reason_category(OUT_OF_MEMORY) == reason_category(PUBLISH_FAILED) == "failed"
    assert reason_category("truncated") == reason_category("corrupt_compressed") == "rejected"


def test_mailbox_close_returns_the_items_nobody_took():
    box: CameraMailboxes[int] = CameraMailboxes(["a", "b"])
    assert box.close() == []
    box = CameraMailboxes(["a", "b"])
    box.put("a", 5)
    box.put("b", 6)
    assert sorted(box.close()) == [5, 6]
    assert box.close() == [] and len(box) == 0


def test_frames_dropped_by_a_stop_are_counted_so_received_equals_published_plus_dropped():
    inside, release = threading.Event(), threading.Event()

    def gated_forecast(rgb):
        if int(rgb[0, 0, 0]) == 2:  # frame 2 holds the worker until released
            inside.set()
            assert release.wait(5)
        return int(rgb[0, 0, 0])

    recorder = Recorder()
    pipeline = make_pipeline(FakeForecaster(one=gated_forecast), recorder)
    pipeline.start()
    pipeline.submit(frame(1))
    assert wait_until(lambda: pipeline.stats.total.published == 1)
    pipeline.submit(frame(2))
    assert inside.wait(2)  # the worker is inside the forecast of frame 2
    pipeline.submit(frame(3))  # waits in the mailbox
    pipeline.stop(timeout=None)  # frame 3 is discarded from the mailbox ...
    pipeline.submit(frame(4))  # ... frame 4 arrives after the stop ...
    release.set()  # ... and frame 2's forecast ends after it: the result is discarded
    assert wait_until(lambda: not pipeline.running)
    stats = pipeline.stats.total.snapshot()
    assert [m for m, _ in recorder.published] == [1]
    assert stats["not_forecast"] == {STOPPED: 3}
    assert stats["received"] == 4 == stats["published"] + sum(stats["not_forecast"].values())
    assert reason_category(STOPPED) == "dropped"


def test_consecutive_failures_count_model_and_publish_failures_and_reset_on_success():
    forecaster, recorder = FakeForecaster(), Recorder()
    forecaster.fail_with = [RuntimeError("boom"), MemoryError()]
    pipeline = make_pipeline(forecaster, recorder)
    assert pipeline.process([frame(1)]) == 0 and pipeline.stats.consecutive_failures == 1
    assert pipeline.process([frame(-1)]) == 0 and pipeline.stats.consecutive_failures == 1  # bad input: no change
    assert pipeline.process([frame(2)]) == 0 and pipeline.stats.consecutive_failures == 2
    assert pipeline.process([frame(3)]) == 1 and pipeline.stats.consecutive_failures == 0


# ------------------------------------------------------------------------------------------------ issue 11
def balanced(pipeline: ForecastPipeline) -> bool:
    stats = pipeline.stats.total
    return stats.received == stats.published + stats.not_forecast.total()


def settle(pipeline: ForecastPipeline) -> None:
    assert wait_until(lambda: pipeline.waiting == 0 and not pipeline.busy and balanced(pipeline))


@pytest.mark.parametrize("error", [TypeError("bad header"), AttributeError("no palette"),
                                   NotImplementedError("unknown pixel format"), KeyError("mode")])
def test_any_decoder_exception_is_a_rejected_input_not_a_node_failure(error):
    """D3: whatever the decoder raises, the frame is counted as rejected bad input; diagnostics never turn ERROR."""
    def fragile_decode(message: int, max_pixels: int) -> np.ndarray:
        if message < 0:
            raise error
        return decode(message, max_pixels)

    recorder = Recorder()
    pipeline = ForecastPipeline(FakeForecaster(), recorder, clock=time.time, decoders={"raw": fragile_decode})
    for _ in range(4):
        pipeline.process([frame(-1)])
    assert pipeline.stats.total.not_forecast.counts() == {"invalid_image": 4}
    assert reason_category("invalid_image") == "rejected"
    assert pipeline.stats.consecutive_failures == 0


def test_frames_are_validated_before_the_stamp_checks():
    """D7: an invalid frame is rejected as invalid even when it is also too old."""
    recorder = Recorder()
    pipeline = make_pipeline(FakeForecaster(), recorder, clock=lambda: 100.0)
    assert pipeline.process([frame(-1, stamp=10.0, max_input_age=0.5)]) == 0  # bad and 90 s old
    assert pipeline.stats.total.not_forecast.counts() == {"truncated": 1}


def test_future_stamps_are_rejected_and_never_reach_the_latency():
    """D6: a frame stamped beyond max_clock_skew ahead of the clock is counted as future_stamp."""
    recorder = Recorder()
    pipeline = make_pipeline(FakeForecaster(), recorder, clock=lambda: 100.0)
    assert pipeline.process([frame(1, stamp=100.0 + 3600.0, max_input_age=1.0, max_clock_skew=0.5)]) == 0
    assert pipeline.process([frame(2, stamp=100.3, max_input_age=1.0, max_clock_skew=0.5)]) == 1  # within the skew
    assert pipeline.stats.total.not_forecast.counts() == {FUTURE_STAMP: 1}
    assert reason_category(FUTURE_STAMP) == "rejected"
    assert pipeline.stats.total.stamp_age.percentile(50) >= -0.5


class CancellableForecaster:
    """Steps of ``step_s`` seconds until ``steps`` are done or the pipeline's stop flag is set."""

    def __init__(self, step_s: float, steps: int) -> None:
        self.step_s, self.steps = step_s, steps
        self.cancel: threading.Event = threading.Event()
        self.started = threading.Event()
        self.steps_done = 0
        self.cancelled_at: List[int] = []  # steps done when the cancel flag was seen

    def forecast_batch(self, requests, cancel=None, **options) -> List[int]:
        self.started.set()
        assert cancel is self.cancel, "the pipeline's stop flag is the forecast's cancel flag"
        for _ in range(self.steps):
            if self.cancel.is_set():
                self.cancelled_at.append(self.steps_done)
                raise ForecastCancelled("cancelled")
            time.sleep(self.step_s)
            self.steps_done += 1
        return [1] * len(requests)


def test_stop_cancels_a_forecast_and_counts_it_stopped():
    """D9: the stop flag is the forecast's cancel flag; the worker exits within a few steps, the frame is stopped."""
    forecaster = CancellableForecaster(step_s=0.02, steps=1000)  # 20 s uncancelled
    recorder = Recorder()
    pipeline = make_pipeline(forecaster, recorder)
    forecaster.cancel = pipeline.stopping
    pipeline.start()
    pipeline.submit(frame(1))
    assert forecaster.started.wait(5)
    steps_at_stop = forecaster.steps_done
    # The join timeout is generous (a loaded machine); what proves the cancel is the step count, not wall time.
    assert pipeline.stop(timeout=30.0), "the worker did not exit"
    assert len(forecaster.cancelled_at) == 1, "the forecast never saw the cancel flag"
    assert forecaster.cancelled_at[0] - steps_at_stop <= 1, "the forecast ran on after the cancel flag was set"
    assert forecaster.steps_done < forecaster.steps
    assert pipeline.stats.total.not_forecast.counts() == {STOPPED: 1} and balanced(pipeline)
    assert recorder.published == []


def test_nothing_is_published_after_stop_returns():
    """stop() waits for a publish in progress; a result finished afterwards is counted stopped, not published."""
    entered, release = threading.Event(), threading.Event()
    published = []

    def slow_publish(frame_, result, settings):
        entered.set()
        release.wait(5)
        published.append(result)

    pipeline = make_pipeline(FakeForecaster(), slow_publish)
    pipeline.start()
    pipeline.submit(frame(7))
    assert entered.wait(5)
    stopper = threading.Thread(target=pipeline.stop, kwargs={"timeout": 5.0})
    stopper.start()
    time.sleep(0.05)
    assert stopper.is_alive(), "stop() returned while a publish was in progress"
    release.set()
    stopper.join(5)
    count = len(published)
    assert count == 1 and pipeline.stats.total.published == 1
    pipeline.stats.received("")  # what submit() counts, for a frame the worker had taken before the stop
    assert pipeline.process([frame(8)]) == 0 and len(published) == count
    assert pipeline.stats.total.not_forecast.counts() == {STOPPED: 1} and balanced(pipeline)


def test_a_real_rclpy_logger_at_debug_level_logs_debug_and_warning_drops_and_the_worker_survives():
    """One call site logged superseded (debug) and rejected (warning) frames: a real rclpy logger at DEBUG raises
    ValueError on the second severity, which killed the worker (or escaped submit). Both must now be logged and
    every later frame still served."""
    from rclpy.logging import LoggingSeverity, get_logger

    logger = get_logger(f"pipeline_logger_test_{time.monotonic_ns()}")
    logger.set_level(LoggingSeverity.DEBUG)
    recorder = Recorder()
    gate = threading.Event()

    def gated_forecast(rgb):
        gate.wait(10)
        return int(rgb[0, 0, 0])

    pipeline = make_pipeline(FakeForecaster(one=gated_forecast), recorder, logger=logger)
    pipeline.start()
    try:
        pipeline.submit(frame(1))  # taken, waits at the gate
        assert wait_until(lambda: pipeline.waiting == 0 and pipeline.busy)
        pipeline.submit(frame(-1))  # bad input, waits in the mailbox ...
        pipeline.submit(frame(-2))  # ... superseded (debug), then rejected (warning) once taken
        gate.set()
        assert wait_until(lambda: pipeline.stats.total.not_forecast.total() == 2 and not pipeline.busy)
        pipeline.submit(frame(-3))  # rejected again (warning), then superseded (debug) logs from the same code
        assert wait_until(lambda: pipeline.stats.total.not_forecast.total() == 3 and not pipeline.busy)
        pipeline.submit(frame(5))
        assert wait_until(lambda: pipeline.stats.total.published == 2), "the worker died on a log call"
        assert pipeline.running
        assert pipeline.stats.total.not_forecast.counts() == {SUPERSEDED: 1, "truncated": 2} and balanced(pipeline)
    finally:
        gate.set()
        pipeline.stop(timeout=5.0)


def test_an_unexpected_exception_in_process_is_counted_and_the_worker_keeps_running():
    """A bug outside process()'s own handlers (here: the clock raising) is counted as forecast_failed, logged, and
    the worker serves the next frame."""
    calls = []

    def flaky_clock() -> float:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected clock failure")
        return time.time()

    recorder = Recorder()
    pipeline = make_pipeline(FakeForecaster(), recorder, clock=flaky_clock)
    pipeline.start()
    try:
        pipeline.submit(frame(1, stamp=time.time()))
        assert wait_until(lambda: pipeline.stats.total.not_forecast.total() == 1 and not pipeline.busy)
        assert pipeline.stats.total.not_forecast.counts() == {FORECAST_FAILED: 1} and pipeline.running
        assert pipeline.stats.consecutive_failures == 1
        pipeline.submit(frame(2, stamp=time.time()))
        assert wait_until(lambda: pipeline.stats.total.published == 1), "the worker stopped after the exception"
        assert balanced(pipeline) and pipeline.stats.consecutive_failures == 0
    finally:
        pipeline.stop(timeout=5.0)


def test_published_is_counted_before_stop_can_return():
    """The published count and the failure streak reset happen under the publish lock, so once stop() returns
    (it waits for that lock) received = published + not forecast holds: no instant where a published frame is
    missing from the counts."""
    from traj_forecast_ros.ros.pipeline import PipelineStats

    under_lock: List[bool] = []
    holder: List[ForecastPipeline] = []

    class WatchedStats(PipelineStats):
        def __setattr__(self, name, value):
            if name in ("published", "consecutive_failures") and holder:
                under_lock.append(holder[0]._publish_lock.locked())
            super().__setattr__(name, value)

    recorder = Recorder()
    book = StatsBook()
    book.total = WatchedStats()
    pipeline = make_pipeline(FakeForecaster(), recorder, stats=book)
    holder.append(pipeline)
    pipeline.start()
    try:
        pipeline.submit(frame(3))
        assert wait_until(lambda: pipeline.stats.total.published == 1 and not pipeline.busy)
        assert under_lock == [True, True], under_lock
        assert balanced(pipeline)
    finally:
        pipeline.stop(timeout=5.0)


# ------------------------------------------------------------------------------------------------ several cameras
def test_frames_of_cameras_waiting_together_go_into_one_call_with_per_camera_accounting():
    gate = threading.Event()

    def gated(rgb):
        if int(rgb[0, 0, 0]) == 1:
            assert gate.wait(5)
        return int(rgb[0, 0, 0])

    forecaster, recorder = FakeForecaster(one=gated), Recorder()
    pipeline = make_pipeline(forecaster, recorder, cameras=("a", "b", "c"))
    pipeline.start()
    try:
        pipeline.submit(frame(1, camera="a"))  # holds the worker
        assert forecaster.started.wait(5)
        for value in (10, 11, 12):  # a floods while busy: only its newest survives
            pipeline.submit(frame(value, camera="a"))
        pipeline.submit(frame(20, camera="b"))
        gate.set()  # c sends nothing: a quiet camera is never waited for
        assert wait_until(lambda: pipeline.stats.total.published == 3 and not pipeline.busy)
    finally:
        pipeline.stop(timeout=5)
    assert forecaster.batches == [1, 2]  # a's newest and b's frame in ONE forecaster call
    assert sorted(m for m, _ in recorder.published) == [1, 12, 20]
    cameras = {name: stats.snapshot() for name, stats in pipeline.stats.cameras.items()}
    assert (cameras["a"]["received"], cameras["a"]["published"], cameras["a"]["not_forecast"]) == (4, 2, {SUPERSEDED: 2})
    assert (cameras["b"]["received"], cameras["b"]["published"], cameras["b"]["not_forecast"]) == (1, 1, {})
    assert (cameras["c"]["received"], cameras["c"]["published"]) == (0, 0)
    total = pipeline.stats.total.snapshot()
    assert total["received"] == 5 == total["published"] + sum(total["not_forecast"].values())


def test_a_flooding_camera_cannot_starve_another_even_one_camera_per_call():
    """max_batch=1: the worker alternates between the cameras with frames waiting (round-robin), so a camera that
    always has a fresh frame does not keep the other out."""
    forecaster, recorder = FakeForecaster(delay=0.01), Recorder()
    pipeline = make_pipeline(forecaster, recorder, cameras=("flood", "slow"), max_batch=1)
    pipeline.start()
    stop_flood = threading.Event()

    def flood():
        value = 100
        while not stop_flood.is_set():
            pipeline.submit(frame(value % 200 + 100, camera="flood"))
            value += 1
            time.sleep(0.001)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        for value in range(5):
            pipeline.submit(frame(value, camera="slow"))
            assert wait_until(lambda: any(m == value for m, _ in recorder.published), 5), f"slow frame {value} starved"
    finally:
        stop_flood.set()
        flooder.join(5)
        pipeline.stop(timeout=5)
    assert set(forecaster.batches) == {1}
    slow = pipeline.stats.cameras["slow"].snapshot()
    assert slow["received"] == slow["published"] == 5 and slow["not_forecast"] == {}
    assert pipeline.stats.cameras["flood"].snapshot()["published"] >= 5


def test_frames_with_different_call_options_are_forecast_in_separate_calls_with_their_limits():
    forecaster, recorder = FakeForecaster(), Recorder()
    pipeline = make_pipeline(forecaster, recorder, cameras=("a", "b"))
    published = pipeline.process([frame(1, camera="a", num_samples=2, max_pixels=5000),
                                  frame(2, camera="b", num_samples=4, seed=7)])
    assert published == 2 and forecaster.batches == [1, 1]
    assert [(o["num_samples"], o["max_pixels"]) for o in forecaster.options] == [(2, 5000), (4, SETTINGS["max_pixels"])]


def test_mailboxes_hand_out_every_waiting_camera_round_robin():
    box: CameraMailboxes[str] = CameraMailboxes(["a", "b", "c"])
    for camera in ("a", "b", "c"):
        box.put(camera, camera)
    assert box.take(timeout=0) == ["a", "b", "c"]  # no limit: every camera waiting, in one take
    for camera in ("a", "b"):
        box.put(camera, camera + "2")
    assert box.take(timeout=0) == ["a2", "b2"]  # whatever camera was served last
    for camera in ("a", "b", "c"):
        box.put(camera, camera)
    assert box.take(timeout=0, limit=1) == ["c"]  # after b: c first
    assert box.take(timeout=0, limit=1) == ["a"]
    box.put("c", "c again")  # c is back before b was served: b still comes first
    assert box.take(timeout=0, limit=1) == ["b"]
    assert box.take(timeout=0, limit=1) == ["c again"]
