"""The forecasting node's runtime without ROS: one-slot mailbox, worker thread, bounded statistics.

The subscription callback only calls :meth:`ForecastPipeline.submit` (O(1), never blocks on inference); one worker
thread takes the newest frame, decodes it, runs the forecaster and hands the result to a publish function. Every
frame that is not forecast is counted under a reason; nothing grows without bound. The ROS node
(``forecast_node``) supplies the decode / forecast / publish functions, so this module is tested with fakes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Generic, Optional, TypeVar

import numpy as np

from traj_forecast_ros.errors import ForecastCancelled, InvalidImageError

Item = TypeVar("Item")

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


@dataclass
class Frame:
    """One input frame waiting for the worker: the undecoded message plus its timing."""

    message: Any
    stamp_s: float  # header stamp in seconds on the node clock's time base (0 = not stamped: no age check)
    instruction: Optional[str] = None  # the task instruction in force when the frame arrived (forecast with it)
    received_s: float = field(default_factory=time.monotonic)  # wall (monotonic) clock when the node received it
    accounted: bool = False  # set once the frame is counted as published or under a reason


class Mailbox(Generic[Item]):
    """A one-slot, thread-safe mailbox: ``put`` replaces an untaken item, ``take`` waits for one."""

    def __init__(self) -> None:
        self._item: Optional[Item] = None
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Item) -> bool:
        """Store ``item``; returns True when it replaced one the worker never took (a superseded frame)."""
        with self._cond:
            superseded = self._item is not None
            self._item = item
            self._cond.notify()
        return superseded

    def take(self, timeout: Optional[float] = None) -> Optional[Item]:
        """Remove and return the item, waiting up to ``timeout`` s; None on timeout or once closed."""
        with self._cond:
            if not self._closed and self._item is None:
                self._cond.wait(timeout)
            if self._closed:
                return None
            item, self._item = self._item, None
            return item

    def close(self) -> Optional[Item]:
        """Wake every waiter; later ``take`` calls return None. Returns the item nobody took (None if empty)."""
        with self._cond:
            self._closed = True
            item, self._item = self._item, None
            self._cond.notify_all()
        return item

    def __len__(self) -> int:
        with self._cond:
            return 0 if self._item is None else 1


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
    forecast_rate: RateMeter = field(init=False)
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


class ForecastPipeline:
    """Mailbox + worker thread: decode (validate) -> stamp checks -> forecast -> publish, counting every frame that
    is not published, so ``received == published + sum(not_forecast)`` once the worker is idle.

    Args:
        decode: message -> uint8 RGB image (raises ``InvalidImageError`` for bad input; any other exception it
            raises is counted as a rejected ``invalid_image`` too).
        forecast: ``(rgb, frame)`` -> forecast result (any object; passed on to ``publish``). It may watch
            :attr:`stopping` and raise ``ForecastCancelled`` once it is set (counted as ``stopped``).
        publish: ``(frame, rgb, result)`` -> None; builds and sends the outputs. Never called after :meth:`stop`
            returned.
        clock: current time in seconds on the same time base as the frame stamps (the node clock).
        max_input_age_s: frames older than this (stamp vs clock) when taken are dropped; 0 disables the check.
        max_clock_skew_s: frames stamped more than this ahead of the clock are rejected (``future_stamp``); None
            disables the check.
        logger: where drops and failures are logged (throttled per reason).
    """

    def __init__(self, decode: Callable[[Any], np.ndarray], forecast: Callable[[np.ndarray, Frame], Any],
                 publish: Callable[[Frame, np.ndarray, Any], None], clock: Callable[[], float],
                 max_input_age_s: float = 0.0, stats: Optional[PipelineStats] = None,
                 logger: Optional[Any] = None, name: str = "forecast-worker",
                 max_clock_skew_s: Optional[float] = None) -> None:
        self._decode = decode
        self._forecast = forecast
        self._publish = publish
        self._clock = clock
        self.max_input_age_s = max_input_age_s
        self.max_clock_skew_s = max_clock_skew_s
        self.stats = stats or PipelineStats()
        self._logger = logger or logging.getLogger(__name__)
        self._mailbox: Mailbox[Frame] = Mailbox()
        self._stop = threading.Event()
        self._submit_lock = threading.Lock()  # a frame is either in the mailbox before it closes or counted stopped
        self._publish_lock = threading.Lock()  # stop() waits for a publish in progress; none starts afterwards
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ------------------------------------------------------------------ called from ROS callbacks
    def submit(self, frame: Frame) -> None:
        """Offer a frame (from the subscription callback): O(1), replaces an unprocessed older one."""
        self.stats.received += 1
        self.stats.input_rate.tick()
        with self._submit_lock:
            stopped = self._stop.is_set()
            superseded = not stopped and self._mailbox.put(frame)
        if stopped:
            self._count(STOPPED, "the frame arrived after the worker was stopped")
        elif superseded:
            self._count(SUPERSEDED, "a newer frame arrived before the worker was free")

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Ask the worker to stop: :attr:`stopping` is set (a forecast watching it is cancelled, any other finishes
        but is not published) and no output is published after this returns. Waits up to ``timeout`` seconds for
        the worker to exit (None = do not wait). Returns True when it has exited."""
        with self._submit_lock:
            self._stop.set()
            waiting = self._mailbox.close()
        if waiting is not None:
            self._count(STOPPED, "the worker was stopped before it took the waiting frame")
        with self._publish_lock:  # a publish in progress ends; later ones see the stop flag
            pass
        if timeout is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> threading.Event:
        """Set once :meth:`stop` was called: the cancel flag for a forecast in progress."""
        return self._stop

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """True while the worker processes a frame."""
        return self._busy.is_set()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self._mailbox.take(timeout=0.5)
            if frame is None:
                continue
            self._busy.set()
            try:
                self.process(frame)
            except Exception as exc:  # noqa: BLE001 - a bug past process()'s own handling must not end the worker
                if not frame.accounted:
                    self._count(FORECAST_FAILED, f"unexpected {type(exc).__name__} in the worker: {exc}")
                self._log_safely("error", f"the worker caught {type(exc).__name__}: {exc} (it keeps running)")
            finally:
                self._busy.clear()

    def process(self, frame: Frame) -> bool:
        """Run one frame through decode -> forecast -> publish; returns True when outputs were published.
        Never raises: every failure is counted and logged (throttled)."""
        started = time.monotonic()
        try:  # validate first: a bad frame is rejected whatever its stamp says
            rgb = self._decode(frame.message)
        except Exception as exc:  # noqa: BLE001 - every decoder failure is bad input, never the node's own failure
            reason = getattr(exc, "reason", INVALID_IMAGE) if isinstance(exc, InvalidImageError) else INVALID_IMAGE
            self._count_frame(frame, reason, f"{type(exc).__name__}: {exc}")
            return False
        if frame.stamp_s > 0:
            now = self._clock()
            if self.max_clock_skew_s is not None and frame.stamp_s - now > self.max_clock_skew_s:
                self._count_frame(frame, FUTURE_STAMP, f"frame is stamped {frame.stamp_s - now:.3f} s ahead of the node clock "
                                          f"> max_clock_skew {self.max_clock_skew_s} s")
                return False
            if self.max_input_age_s > 0 and now - frame.stamp_s > self.max_input_age_s:
                self._count_frame(frame, TOO_OLD, f"frame is {now - frame.stamp_s:.3f} s old > max_input_age "
                                     f"{self.max_input_age_s} s")
                return False
        try:
            inference_started = time.monotonic()
            result = self._forecast(rgb, frame)
            inference_s = time.monotonic() - inference_started
        except Exception as exc:  # noqa: BLE001 - bad input or a failing model must never stop the node
            reason = STOPPED if self._stop.is_set() else classify_error(exc)
            self._count_frame(frame, reason, f"{type(exc).__name__}: {exc}")
            return False
        with self._publish_lock:
            if self._stop.is_set():  # stopped during inference: the result is discarded
                self._count_frame(frame, STOPPED, "the worker was stopped during inference; the result is discarded")
                return False
            try:
                self._publish(frame, rgb, result)
            except Exception as exc:  # noqa: BLE001
                self._count_frame(frame, PUBLISH_FAILED, f"{type(exc).__name__}: {exc}")
                return False
            # Counted before stop() can return: received = published + not forecast holds once it has.
            self.stats.published += 1
            frame.accounted = True
            self.stats.consecutive_failures = 0
        self.stats.forecast_rate.tick()
        self.stats.inference.add(inference_s)
        published = time.monotonic()
        self.stats.overhead.add(published - started - inference_s)
        self.stats.processing.add(published - frame.received_s)
        if frame.stamp_s > 0:
            self.stats.stamp_age.add(self._clock() - frame.stamp_s)
        return True

    def _count_frame(self, frame: Frame, reason: str, detail: str) -> None:
        frame.accounted = True
        self._count(reason, detail)

    def _log_safely(self, severity: str, line: str) -> None:
        """Log ``line``, one call site per severity (an rclpy logger raises ValueError when one call site logs at
        two severities); a logger that raises anyway loses the line, never a count or the worker."""
        try:
            if severity == "error":
                self._logger.error(line)
            elif severity == "warning":
                self._logger.warning(line)
            else:
                self._logger.debug(line)
        except Exception:  # noqa: BLE001 - a failing logger must not lose the count or end the worker
            pass

    def _count(self, reason: str, detail: str) -> None:
        if reason_category(reason) == "failed":
            self.stats.consecutive_failures += 1
        if self.stats.not_forecast.add(reason):
            total = self.stats.not_forecast.counts().get(reason, 0)
            line = f"{reason_category(reason)} frame ({reason}, {total} so far): {detail}"
            # Superseded frames are the mailbox doing its job (camera faster than the model) and stopped frames
            # are the node shutting down or deactivating on purpose: not a warning.
            self._log_safely("debug" if reason in (SUPERSEDED, STOPPED) else "warning", line)
