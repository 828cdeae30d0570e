"""The node's bounded statistics: frame counters by reason, rates and latency windows, per camera and in total.

Every frame a camera receives ends up published or counted under one reason, so for each camera and for the node
``received == published + sum(not_forecast)`` once the worker is idle. No rclpy here.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Optional, Sequence

import numpy as np

from traj_forecast_ros.errors import ForecastCancelled, InvalidImageError

# Drop / rejection reasons (counter keys).
SUPERSEDED = "superseded"  # replaced in the mailbox by a newer frame before the worker took it
TOO_OLD = "too_old"  # older than max_input_age when the worker took it
FUTURE_STAMP = "future_stamp"  # stamped further ahead of the node clock than max_clock_skew (a sender clock problem)
INVALID_IMAGE = "invalid_image"  # decode or forecaster input check failed (a more specific reason when known)
OUT_OF_MEMORY = "out_of_memory"  # the forecaster ran out of (accelerator) memory
FORECAST_FAILED = "forecast_failed"  # the forecaster raised anything else
PUBLISH_FAILED = "publish_failed"  # building or publishing the outputs raised
STOPPED = "stopped"  # arrived, waited or was in inference (cancelled) while the worker stopped (deactivate, shutdown)


DROPPED_REASONS = frozenset({SUPERSEDED, TOO_OLD, STOPPED})  # good frames the node had no time for
FAILED_REASONS = frozenset({OUT_OF_MEMORY, FORECAST_FAILED, PUBLISH_FAILED})  # the node's own failures


def reason_category(reason: str) -> str:
    """``"dropped"`` (no time for it), ``"failed"`` (model or publishing failed) or ``"rejected"`` (bad input)."""
    if reason in DROPPED_REASONS:
        return "dropped"
    if reason in FAILED_REASONS:
        return "failed"
    return "rejected"


class RateMeter:
    """Events per second over the last ``window_s`` seconds of the wall (monotonic) clock: the events in the window
    divided by its length (shorter while the meter is younger than the window). Meters that share ``started`` and
    ``window_s`` divide by the same span, so their rates compare as their counts do (timestamps kept in a bounded
    deque). ``started`` None: the first event starts the meter."""

    def __init__(self, window_s: float = 5.0, max_events: int = 1000, started: Optional[float] = None) -> None:
        self.window_s = window_s
        self.started = started
        self._times: Deque[float] = collections.deque(maxlen=max_events)
        self._lock = threading.Lock()

    def tick(self, now: Optional[float] = None) -> None:
        """Record one event."""
        with self._lock:
            now = time.monotonic() if now is None else now
            if self.started is None:
                self.started = now
            self._times.append(now)

    def rate(self, now: Optional[float] = None) -> float:
        """Events per second in the window ending at ``now`` (0 before the first event)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = sum(1 for t in self._times if now - t < self.window_s)
            span = min(self.window_s, now - self.started) if self.started is not None else 0.0
        return recent / span if recent and span > 0 else 0.0

    def period(self) -> Optional[float]:
        """Median time between the recorded events (None with fewer than 2)."""
        with self._lock:
            times = list(self._times)
        if len(times) < 2:
            return None
        return float(np.median(np.diff(times)))


class Window:
    """The last ``size`` values of a measurement, with percentiles."""

    def __init__(self, size: int = 200) -> None:
        self._values: Deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        """Record a value."""
        with self._lock:
            self._values.append(float(value))

    def percentile(self, q: float) -> Optional[float]:
        """The ``q``-th percentile (0..100) of the window, None when empty."""
        with self._lock:
            values = list(self._values)
        return float(np.percentile(values, q)) if values else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)


class ReasonCounter:
    """Thread-safe counts by reason, plus when each reason was last logged (for per-reason log throttling)."""

    def __init__(self, log_interval_s: float = 5.0) -> None:
        self.log_interval_s = log_interval_s
        self._counts: Dict[str, int] = collections.Counter()
        self._last_logged: Dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, reason: str, now: Optional[float] = None) -> bool:
        """Count one event; returns True when a log line for ``reason`` is due (first time, then throttled)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._counts[reason] += 1
            last = self._last_logged.get(reason)
            if last is None or now - last >= self.log_interval_s:
                self._last_logged[reason] = now
                return True
            return False

    def counts(self) -> Dict[str, int]:
        """A snapshot of the counts."""
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        """Sum over all reasons."""
        with self._lock:
            return sum(self._counts.values())


@dataclass
class PipelineStats:
    """Everything the diagnostics report, bounded in memory."""

    window: int = 200
    started: float = field(default_factory=time.monotonic)  # both rates count from here, over the same window
    input_rate: RateMeter = field(init=False)
    forecast_rate: RateMeter = field(init=False)  # may exceed input_rate by the frames in flight (at most two per
    # camera: mailbox and worker) over the window, since a forecast in the window can be of a frame received before it
    processing: Window = field(init=False)  # seconds on the wall (monotonic) clock, frame received -> published
    stamp_age: Window = field(init=False)  # seconds on the node clock (simulated under use_sim_time), header
    # stamp -> published: transport and camera delay included; a bag replayed at rate r scales it by r
    inference: Window = field(init=False)  # seconds spent in the forecaster
    overhead: Window = field(init=False)  # seconds in the worker beyond the forecaster (decode, pack, publish)
    not_forecast: ReasonCounter = field(default_factory=ReasonCounter)  # frames not forecast, by reason
    received: int = 0
    published: int = 0
    consecutive_failures: int = 0  # "failed" frames (model or publishing) since the last published forecast

    def __post_init__(self) -> None:
        self.input_rate = RateMeter(started=self.started)
        self.forecast_rate = RateMeter(started=self.started)
        self.processing = Window(self.window)
        self.stamp_age = Window(self.window)
        self.inference = Window(self.window)
        self.overhead = Window(self.window)

    def snapshot(self) -> Dict[str, Any]:
        """Plain values for diagnostics: rates (Hz, wall clock), latencies (s: ``processing`` on the wall clock,
        ``stamp_age`` on the node clock), counts."""
        return {
            "received": self.received,
            "published": self.published,
            "input_rate_hz": self.input_rate.rate(),
            "forecast_rate_hz": self.forecast_rate.rate(),
            "processing_p50_s": self.processing.percentile(50),
            "processing_p95_s": self.processing.percentile(95),
            "stamp_age_p50_s": self.stamp_age.percentile(50),
            "stamp_age_p95_s": self.stamp_age.percentile(95),
            "inference_p50_s": self.inference.percentile(50),
            "inference_p95_s": self.inference.percentile(95),
            "overhead_p50_s": self.overhead.percentile(50),
            "overhead_p95_s": self.overhead.percentile(95),
            "not_forecast": self.not_forecast.counts(),
        }


def classify_error(exc: BaseException) -> str:
    """Counter reason for an exception raised while decoding or forecasting a frame."""
    if isinstance(exc, ForecastCancelled):
        return STOPPED
    if isinstance(exc, InvalidImageError):
        return getattr(exc, "reason", INVALID_IMAGE)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return OUT_OF_MEMORY
    return FORECAST_FAILED


class StatsBook:
    """The node's :class:`PipelineStats` (``total``) and one per camera (``cameras``): every event is recorded in
    both, so the per-camera counts add up to the node's. One camera rate window and start time for all."""

    def __init__(self, cameras: Sequence[str] = ("",), window: int = 200) -> None:
        self.total = PipelineStats(window=window)
        self.cameras: Dict[str, PipelineStats] = {
            camera: PipelineStats(window=window, started=self.total.started) for camera in cameras}

    def _both(self, camera: str) -> Sequence[PipelineStats]:
        return (self.total, self.cameras[camera]) if camera in self.cameras else (self.total,)

    def received(self, camera: str) -> None:
        """One frame arrived from ``camera``."""
        for stats in self._both(camera):
            stats.received += 1
            stats.input_rate.tick()

    def count(self, camera: str, reason: str) -> bool:
        """One frame of ``camera`` not forecast for ``reason``; True when a log line for it is due (node-wide)."""
        if reason_category(reason) == "failed":
            self.total.consecutive_failures += 1
        if camera in self.cameras:
            self.cameras[camera].not_forecast.add(reason)
        return self.total.not_forecast.add(reason)

    def published(self, camera: str) -> None:
        """One forecast of ``camera`` published (counted before the worker's stop can return)."""
        for stats in self._both(camera):
            stats.published += 1
        self.total.consecutive_failures = 0

    def timings(self, camera: str, inference_s: float, overhead_s: float, processing_s: float,
                stamp_age_s: Optional[float]) -> None:
        """The latencies of one published forecast."""
        for stats in self._both(camera):
            stats.forecast_rate.tick()
            stats.inference.add(inference_s)
            stats.overhead.add(overhead_s)
            stats.processing.add(processing_s)
            if stamp_age_s is not None:
                stats.stamp_age.add(stamp_age_s)

    @property
    def consecutive_failures(self) -> int:
        """Frames in a row, any camera, whose forecast or publishing failed; reset by a published forecast."""
        return self.total.consecutive_failures

    def period(self, camera: str) -> Optional[float]:
        """Median seconds between ``camera``'s published forecasts (None before two)."""
        stats = self.cameras.get(camera, self.total)
        return stats.forecast_rate.period()
