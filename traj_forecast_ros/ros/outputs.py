"""The forecast node's outputs for one forecast, built from a parameter snapshot (no rclpy node needed).

Used by ``forecast_node`` (live) and ``bag run`` (offline) through the output table
(:data:`traj_forecast_ros.ros.io_tables.OUTPUTS`), so both publish identical messages: ``TrajectoryForecast``, the
``MarkerArray`` on the camera's image plane, and the overlay ``Image``. The one marker builder writes the markers'
CDR bytes with numpy (about 2 ms at K=8, 64x64, 16 frames, 15,360 vertices, against about 50 ms for building and
converting a Python ``Point`` and ``ColorRGBA`` per vertex, which also holds the GIL the forecast worker needs);
``Publisher.publish(bytes)`` and the bag writer take them as they are. :class:`SideOutputs` builds the optional
outputs on their own thread, so the forecast worker goes back to the next frames as soon as the forecasts are out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import numpy as np

from traj_forecast_ros.ros.conversions import forecast_to_msg, rgb_to_image_msg
from traj_forecast_ros.ros.markers import ImagePlane, MarkerSerializer, forecast_markers, lifetime_from_period
from traj_forecast_ros.ros.settings import Settings
from traj_forecast_ros.viz import draw_tracks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputJob:
    """Everything one camera's outputs of one forecast are built from."""

    forecast: Any
    rgb: np.ndarray  # [H, W, 3] uint8: the decoded source frame (the overlay's background)
    header: Any  # the source image's header (frame_id filled from the camera_frame parameter when it has none)
    settings: Settings  # the parameter snapshot the frame was forecast with
    camera_info: Any = None  # the camera's latest sensor_msgs/CameraInfo (None: marker_pixel_size is used)
    period_s: Optional[float] = None  # seconds between this camera's forecasts (marker lifetime), None = unknown
    model_frame_interval: float = 0.0  # the model config's seconds between forecast frames (0 = unknown)


class OutputBuilder:
    """Builds the forecast, markers and overlay of an :class:`OutputJob`. ``warn`` reports an unusable CameraInfo
    (the node passes a throttled logger). Holds only the marker serialiser's choice of path."""

    def __init__(self, warn: Optional[Callable[[str], None]] = None) -> None:
        self.warn = warn or log.warning
        self._serialize_markers = MarkerSerializer(warn=self.warn)

    @staticmethod
    def frame_interval(job: OutputJob) -> float:
        """Seconds between forecast frames: the parameter, else the model's own value, else 0 (unknown)."""
        return float(job.settings["frame_interval"]) or float(job.model_frame_interval or 0.0)

    def forecast(self, job: OutputJob) -> Any:
        """``TrajectoryForecast`` carrying the source header, the planner summaries and, from the CameraInfo when
        it describes this image, the intrinsics."""
        return forecast_to_msg(job.forecast, job.header, frame_interval=self.frame_interval(job),
                               moving_threshold=float(job.settings["moving_threshold"]), camera_info=job.camera_info)

    def markers(self, job: OutputJob) -> bytes:
        """The ``MarkerArray`` on the image plane (pinhole from the CameraInfo when given, else the pixel scale),
        serialised: the same message :meth:`markers_message` builds, read back."""
        plane, options = self._marker_arguments(job)
        return self._serialize_markers(job.forecast.tracks, job.header, plane, **options)

    def markers_message(self, job: OutputJob) -> Any:
        """:meth:`markers` as a message object (for tests and readers; the node and ``bag run`` use the bytes)."""
        plane, options = self._marker_arguments(job)
        return forecast_markers(job.forecast.tracks, job.header, plane, **options)

    @property
    def direct_markers(self) -> Optional[bool]:
        """Whether :meth:`markers` writes the CDR directly (True) or serialises message objects (False: the direct
        path did not match rclpy here); None before its first call."""
        return self._serialize_markers.fast

    def _marker_arguments(self, job: OutputJob) -> Tuple[ImagePlane, Dict[str, Any]]:
        """The image plane and the keyword options of the markers, from the snapshot."""
        settings = job.settings
        depth = float(settings["marker_plane_depth"])
        image_size = tuple(job.forecast.image_size)
        plane = None
        if job.camera_info is not None:
            try:
                plane = ImagePlane.from_camera_info(job.camera_info, image_size, depth)
            except ValueError as exc:
                self.warn(f"ignoring CameraInfo: {exc}")
        if plane is None:
            plane = ImagePlane.from_pixel_size(image_size, float(settings["marker_pixel_size"]), depth)
        lifetime = lifetime_from_period(job.period_s, float(settings["marker_lifetime_periods"]),
                                        fallback_s=max(float(job.forecast.timings.get("total", 0.0)), 1.0))
        return plane, dict(stride=int(settings["marker_stride"]), lifetime_s=lifetime,
                           line_width=float(settings["marker_line_width"]),
                           max_samples=int(settings["marker_samples"]),
                           max_frames=int(settings["marker_max_frames"]))

    def overlay(self, job: OutputJob) -> Any:
        """Overlay ``Image``: one sample's tracks drawn over the source frame."""
        sample = min(int(job.settings["overlay_sample"]), job.forecast.num_samples - 1)
        drawn = draw_tracks(job.rgb, job.forecast.tracks[sample], stride=int(job.settings["overlay_stride"]))
        return rgb_to_image_msg(drawn, job.header)


class SideOutputs:
    """One background thread that runs output jobs (build + publish markers / overlay), the newest per key.

    :meth:`submit` hands a job over and returns at once; a job still waiting when a newer one with the same key (the
    camera) arrives is dropped (counted in ``skipped``: its forecast is already outdated). Jobs of different keys all
    run, oldest key first, so one camera's outputs never push out another's. A job that raises is counted in ``failed`` and
    reported through ``on_error``; the thread keeps running. :meth:`stop` lets the running job finish, drops a
    waiting one and ends the thread; the next :meth:`submit` starts a new one.
    """

    def __init__(self, on_error: Optional[Callable[[BaseException], None]] = None,
                 name: str = "forecast_side_outputs") -> None:
        self.on_error = on_error or (lambda exc: log.error("building side outputs failed: %s", exc))
        self.name = name
        self.skipped = 0
        self.failed = 0
        self.done = 0
        self._condition = threading.Condition()
        self._jobs: Dict[Hashable, Callable[[], None]] = {}  # waiting jobs, one per key, in submission order
        self._stopping = False
        self._running = 0  # jobs being run: 0, or 1 (2 for a moment while a stopped thread finishes its last job)
        self._generation = 0  # the thread of the current generation is the only one that takes jobs
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: Callable[[], None], key: Hashable = "") -> None:
        """Run ``job`` on the side thread (replacing a job of the same ``key`` that has not started yet)."""
        with self._condition:
            if self._jobs.pop(key, None) is not None:
                self.skipped += 1
            self._jobs[key] = job
            # A thread told to stop may still be finishing its last job (stop() timed out): it must not take this
            # one, so a new thread of a new generation takes over.
            if self._stopping or self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._generation += 1
                self._thread = threading.Thread(target=self._run, args=(self._generation,), name=self.name,
                                                daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def counts(self) -> Dict[str, int]:
        """Jobs ``done``, ``skipped`` (replaced by a newer one, or dropped by :meth:`stop`) and ``failed`` so far, and
        ``pending`` (one waiting and/or one running: 0 to 2): every submitted job is in exactly one of them."""
        with self._condition:
            return {"done": self.done, "skipped": self.skipped, "failed": self.failed,
                    "pending": len(self._jobs) + self._running}

    def idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no job is waiting or running; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._jobs and self._running == 0, timeout)

    def _run(self, generation: int) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._jobs) or self._stopping
                                         or self._generation != generation)
                if self._stopping or self._generation != generation:
                    return
                job = self._jobs.pop(next(iter(self._jobs)))
                self._running += 1
            succeeded = False
            try:
                job()
                succeeded = True
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end the side outputs
                self.on_error(exc)
            finally:
                with self._condition:  # counted and no longer running in one step: counts() always adds up
                    if succeeded:
                        self.done += 1
                    else:
                        self.failed += 1
                    self._running -= 1
                    self._condition.notify_all()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drop the waiting jobs, let the running one finish (up to ``timeout`` s) and end the thread; True when it
        ended."""
        with self._condition:
            self.skipped += len(self._jobs)
            self._jobs.clear()
            self._stopping = True
            self._condition.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()
