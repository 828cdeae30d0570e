"""The forecasting node's runtime without ROS: the cameras' mailboxes, one worker thread, the frame accounting.

A subscription callback only calls :meth:`ForecastPipeline.submit` (O(1), never blocks on inference). The worker
takes the frames waiting, at most one per camera (:mod:`.scheduler`), decodes and validates each once against its
parameter snapshot's limits (the input table's decoder), forecasts the valid ones in one ``forecast_batch`` call per
set of shared options (:mod:`.batching`) and hands each result to ``publish(frame, forecast, settings)``. The
pipeline is given the forecaster and never calls back into the node. Every frame that is not forecast is counted
under a reason, per camera and in total (:mod:`.stats`); nothing grows without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from traj_forecast_ros.errors import InvalidImageError
from traj_forecast_ros.ros.batching import CallOptions, forecast_requests, request_for
from traj_forecast_ros.ros.conversions import decode_image
from traj_forecast_ros.ros.io_tables import INPUTS
from traj_forecast_ros.ros.scheduler import CameraMailboxes
from traj_forecast_ros.ros.settings import Settings
from traj_forecast_ros.ros.stats import (  # noqa: F401 - the reasons and counters are part of this module's API
    DROPPED_REASONS, FAILED_REASONS, FORECAST_FAILED, FUTURE_STAMP, INVALID_IMAGE, OUT_OF_MEMORY, PUBLISH_FAILED,
    STOPPED, SUPERSEDED, TOO_OLD, PipelineStats, StatsBook, classify_error, reason_category)

Publish = Callable[["Frame", Any, Settings], None]
Decoder = Callable[[Any, int], np.ndarray]  # (message, max_pixels) -> [H, W, 3] uint8 RGB; raises InvalidImageError


@dataclass
class Frame:
    """One input frame of one camera: the undecoded message, its timing and the parameter snapshot it is
    forecast and published with."""

    message: Any
    stamp_s: float  # header stamp in seconds on the node clock's time base (0 = not stamped: no age check)
    settings: Settings
    camera: str = ""  # the camera's name ("" = the single camera of the image_topic setup)
    transport: str = "raw"  # a key of the input table: which decoder reads the message
    instruction: Optional[str] = None  # the task instruction in force when the frame arrived (forecast with it)
    camera_info: Any = None  # the camera's latest sensor_msgs/CameraInfo when the frame arrived (None: none yet)
    received_s: float = field(default_factory=time.monotonic)  # wall (monotonic) clock when the node received it
    rgb: Optional[np.ndarray] = None  # [H, W, 3] uint8 once decoded
    accounted: bool = False  # set once the frame is counted as published or under a reason


class ForecastPipeline:
    """Mailboxes + worker thread: decode (validate) -> stamp checks -> one batched forecast -> publish, counting
    every frame that is not published, so ``received == published + sum(not_forecast)`` per camera and in total
    once the worker is idle.

    Args:
        forecaster: has ``forecast_batch`` (or ``forecast``: called once per frame). It may watch :attr:`stopping`
            (passed as ``cancel``) and raise ``ForecastCancelled`` once it is set (counted as ``stopped``).
        publish: ``(frame, forecast, settings)`` -> None; builds and sends the frame's outputs. Never called after
            :meth:`stop` returned.
        clock: current time in seconds on the same time base as the frame stamps (the node clock).
        cameras: the camera names (one mailbox and one set of counters each).
        decoders: transport -> ``(message, max_pixels) -> rgb`` (default: the input table's).
        takes_instruction: False for a model without language input: instructions are left out of the requests.
        max_batch: at most this many cameras' frames per forecaster call (0 = every camera with a frame waiting).
        logger: where drops and failures are logged (throttled per reason).
    """

    def __init__(self, forecaster: Any, publish: Publish, clock: Callable[[], float], cameras: Sequence[str] = ("",),
                 *, decoders: Optional[Mapping[str, Decoder]] = None, takes_instruction: bool = True,
                 max_batch: int = 0, stats: Optional[StatsBook] = None, logger: Optional[Any] = None,
                 name: str = "forecast-worker") -> None:
        self._forecaster = forecaster
        self._publish = publish
        self._clock = clock
        self._decoders: Dict[str, Decoder] = dict(decoders) if decoders is not None else {
            transport: partial(decode_image, transport) for transport in INPUTS}
        self.takes_instruction = takes_instruction
        self.max_batch = max_batch
        self.stats = stats or StatsBook(cameras)
        self._logger = logger or logging.getLogger(__name__)
        self._mailboxes: CameraMailboxes[Frame] = CameraMailboxes(cameras)
        self._stop = threading.Event()
        self._submit_lock = threading.Lock()  # a frame is either in a mailbox before they close or counted stopped
        self._publish_lock = threading.Lock()  # stop() waits for a publish in progress; none starts afterwards
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batch_sizes: List[int] = []  # frames per forecaster call, the last 100 (diagnostics and tests)

    # ------------------------------------------------------------------ called from ROS callbacks
    def submit(self, frame: Frame) -> None:
        """Offer a frame (from a subscription callback): O(1), replaces the camera's unprocessed older one."""
        self.stats.received(frame.camera)
        with self._submit_lock:
            stopped = self._stop.is_set()
            superseded = None if stopped else self._mailboxes.put(frame.camera, frame)
        if stopped:
            self._count(frame.camera, STOPPED, "the frame arrived after the worker was stopped")
        elif superseded:
            self._count(frame.camera, SUPERSEDED, "a newer frame arrived before the worker was free")

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Ask the worker to stop: :attr:`stopping` is set (a forecast watching it is cancelled, any other finishes
        but is not published) and no output is published after this returns. Waits up to ``timeout`` seconds for
        the worker to exit (None = do not wait). Returns True when it has exited."""
        with self._submit_lock:
            self._stop.set()
            waiting = self._mailboxes.close()
        for frame in waiting:
            self._count(frame.camera, STOPPED, "the worker was stopped before it took the waiting frame")
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
        """True while the worker processes frames."""
        return self._busy.is_set()

    @property
    def waiting(self) -> int:
        """Frames waiting in the mailboxes."""
        return len(self._mailboxes)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stop.is_set():
            frames = self._mailboxes.take(timeout=0.5, limit=self.max_batch)
            if not frames:
                continue
            self._busy.set()
            try:
                self.process(frames)
            except Exception as exc:  # noqa: BLE001 - a bug past process()'s own handling must not end the worker
                for frame in frames:
                    if not frame.accounted:
                        self._count_frame(frame, FORECAST_FAILED, f"unexpected {type(exc).__name__} in the worker")
                self._log_safely("error", f"the worker caught {type(exc).__name__}: {exc} (it keeps running)")
            finally:
                self._busy.clear()

    def process(self, frames: Sequence[Frame]) -> int:
        """Run frames (at most one per camera) through decode -> checks -> forecast -> publish; returns how many
        were published. Never raises: every failure is counted and logged (throttled)."""
        started = time.monotonic()
        ready = [frame for frame in frames if self._admit(frame)]
        groups: Dict[CallOptions, List[Frame]] = {}
        for frame in ready:
            groups.setdefault(CallOptions.from_settings(frame.settings), []).append(frame)
        published = 0
        for options, group in groups.items():
            published += self._forecast_and_publish(options, group, started)
        return published

    def _admit(self, frame: Frame) -> bool:
        """Decode and validate the frame with its snapshot's limits, then check its stamp; False once counted."""
        try:  # validate first: a bad frame is rejected whatever its stamp says
            decode = self._decoders[frame.transport]
            frame.rgb = decode(frame.message, int(frame.settings["max_pixels"]))
        except Exception as exc:  # noqa: BLE001 - every decoder failure is bad input, never the node's own failure
            reason = classify_error(exc) if isinstance(exc, InvalidImageError) else INVALID_IMAGE
            self._count_frame(frame, reason, f"{type(exc).__name__}: {exc}")
            return False
        if frame.stamp_s > 0:
            now = self._clock()
            skew, max_age = float(frame.settings["max_clock_skew"]), float(frame.settings["max_input_age"])
            if frame.stamp_s - now > skew:
                self._count_frame(frame, FUTURE_STAMP, f"frame is stamped {frame.stamp_s - now:.3f} s ahead of the "
                                                       f"node clock > max_clock_skew {skew} s")
                return False
            if max_age > 0 and now - frame.stamp_s > max_age:
                self._count_frame(frame, TOO_OLD, f"frame is {now - frame.stamp_s:.3f} s old > max_input_age "
                                                  f"{max_age} s")
                return False
        return True

    def _forecast_and_publish(self, options: CallOptions, frames: List[Frame], started: float) -> int:
        """One forecaster call for ``frames``, then each frame's outputs; returns how many were published."""
        requests = [request_for(frame.rgb, frame.instruction if self.takes_instruction else None, frame.settings)
                    for frame in frames]
        try:
            inference_started = time.monotonic()
            results = forecast_requests(self._forecaster, requests, options, cancel=self._stop)
            inference_s = time.monotonic() - inference_started
        except Exception as exc:  # noqa: BLE001 - bad input or a failing model must never stop the node
            reason = STOPPED if self._stop.is_set() else classify_error(exc)
            for frame in frames:
                self._count_frame(frame, reason, f"{type(exc).__name__}: {exc}")
            return 0
        self.batch_sizes = (self.batch_sizes + [len(frames)])[-100:]
        published = 0
        for frame, result in zip(frames, results):
            published += self._publish_one(frame, result, inference_s, started)
        return published

    def _publish_one(self, frame: Frame, result: Any, inference_s: float, started: float) -> int:
        with self._publish_lock:
            if self._stop.is_set():  # stopped during inference: the result is discarded
                self._count_frame(frame, STOPPED, "the worker was stopped during inference; the result is discarded")
                return 0
            try:
                self._publish(frame, result, frame.settings)
            except Exception as exc:  # noqa: BLE001
                self._count_frame(frame, PUBLISH_FAILED, f"{type(exc).__name__}: {exc}")
                return 0
            # Counted before stop() can return: received = published + not forecast holds once it has.
            self.stats.published(frame.camera)
            frame.accounted = True
        published_at = time.monotonic()
        stamp_age = self._clock() - frame.stamp_s if frame.stamp_s > 0 else None
        self.stats.timings(frame.camera, inference_s, published_at - started - inference_s,
                           published_at - frame.received_s, stamp_age)
        return 1

    def _count_frame(self, frame: Frame, reason: str, detail: str) -> None:
        frame.accounted = True
        self._count(frame.camera, reason, detail)

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

    def _count(self, camera: str, reason: str, detail: str) -> None:
        if self.stats.count(camera, reason):
            total = self.stats.total.not_forecast.counts().get(reason, 0)
            where = f"camera {camera}: " if camera else ""
            line = f"{where}{reason_category(reason)} frame ({reason}, {total} so far): {detail}"
            # Superseded frames are the mailbox doing its job (camera faster than the model) and stopped frames
            # are the node shutting down or deactivating on purpose: not a warning.
            self._log_safely("debug" if reason in (SUPERSEDED, STOPPED) else "warning", line)
