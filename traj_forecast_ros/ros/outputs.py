"""The forecast node's three outputs for one forecast, built from its parameters (no rclpy node needed).

Used by ``forecast_node`` (live) and ``bag run`` (offline) so both publish identical messages:
``TrajectoryForecast``, the ``MarkerArray`` on the camera's image plane, and the overlay ``Image``.
:class:`SideOutputs` builds the optional two on their own thread, so the forecast worker goes back to the next frame
as soon as the forecast is out. For publishing, :meth:`OutputBuilder.markers_serialized` writes the markers' CDR
with numpy (about 2 ms at K=8, 64x64, 16 frames, 15,360 vertices, against about 50 ms for building and converting
a Python ``Point`` and ``ColorRGBA`` per vertex, which also holds the GIL that the forecast worker needs).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from traj_forecast_ros.ros.conversions import forecast_to_msg, rgb_to_image_msg
from traj_forecast_ros.ros.markers import ImagePlane, MarkerSerializer, forecast_markers, lifetime_from_period
from traj_forecast_ros.viz import draw_tracks

log = logging.getLogger(__name__)


class OutputBuilder:
    """Builds forecast, markers and overlay messages, reading the node's parameters through ``param(name)``.

    ``param`` is read on every call, so live parameter changes take effect. ``model_frame_interval`` (the model
    config's seconds between forecast frames) is used when the ``frame_interval`` parameter is 0. ``warn`` reports an
    unusable CameraInfo (the node passes a throttled logger).
    """

    def __init__(self, param: Callable[[str], Any], model_frame_interval: float = 0.0,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.param = param
        self.model_frame_interval = float(model_frame_interval or 0.0)
        self.warn = warn or log.warning
        self._serialize_markers = MarkerSerializer(warn=self.warn)

    def frame_interval(self) -> float:
        """Seconds between forecast frames: the parameter, else the model's own value (its config's
        ``frame_interval_s``), else 0 (unknown)."""
        return float(self.param("frame_interval")) or self.model_frame_interval

    def forecast_msg(self, forecast: Any, header: Any, camera_info: Any = None) -> Any:
        """``TrajectoryForecast`` carrying the source header, the planner summaries and, from ``camera_info`` when
        it describes this image, the intrinsics."""
        return forecast_to_msg(forecast, header, frame_interval=self.frame_interval(),
                               moving_threshold=float(self.param("moving_threshold")), camera_info=camera_info)

    def markers(self, forecast: Any, header: Any, camera_info: Any, period_s: Optional[float]) -> Any:
        """``MarkerArray`` on the image plane (pinhole from ``camera_info`` when given, else the pixel scale)."""
        plane, options = self._marker_arguments(forecast, camera_info, period_s)
        return forecast_markers(forecast.tracks, header, plane, **options)

    def markers_serialized(self, forecast: Any, header: Any, camera_info: Any, period_s: Optional[float]) -> bytes:
        """:meth:`markers` serialised, for ``Publisher.publish(bytes)``: the same message, read back, at a fraction
        of the cost (see :class:`~traj_forecast_ros.ros.markers.MarkerSerializer`)."""
        plane, options = self._marker_arguments(forecast, camera_info, period_s)
        return self._serialize_markers(forecast.tracks, header, plane, **options)

    @property
    def direct_markers(self) -> Optional[bool]:
        """Whether :meth:`markers_serialized` writes the CDR directly (True) or serialises message objects (False:
        the direct path did not match rclpy here); None before its first call."""
        return self._serialize_markers.fast

    def _marker_arguments(self, forecast: Any, camera_info: Any,
                          period_s: Optional[float]) -> Tuple[ImagePlane, Dict[str, Any]]:
        """The image plane and the keyword options of the markers, from the parameters."""
        depth = float(self.param("marker_plane_depth"))
        image_size = tuple(forecast.image_size)
        plane = None
        if camera_info is not None:
            try:
                plane = ImagePlane.from_camera_info(camera_info, image_size, depth)
            except ValueError as exc:
                self.warn(f"ignoring CameraInfo: {exc}")
        if plane is None:
            plane = ImagePlane.from_pixel_size(image_size, float(self.param("marker_pixel_size")), depth)
        lifetime = lifetime_from_period(period_s, float(self.param("marker_lifetime_periods")),
                                        fallback_s=max(float(forecast.timings.get("total", 0.0)), 1.0))
        return plane, dict(stride=int(self.param("marker_stride")), lifetime_s=lifetime,
                           line_width=float(self.param("marker_line_width")),
                           max_samples=int(self.param("marker_samples")),
                           max_frames=int(self.param("marker_max_frames")))

    def overlay(self, forecast: Any, rgb: np.ndarray, header: Any) -> Any:
        """Overlay ``Image``: one sample's tracks drawn over the source frame."""
        sample = min(int(self.param("overlay_sample")), forecast.num_samples - 1)
        drawn = draw_tracks(rgb, forecast.tracks[sample], stride=int(self.param("overlay_stride")))
        return rgb_to_image_msg(drawn, header)


class SideOutputs:
    """One background thread that runs output jobs (build + publish markers / overlay), newest first.

    :meth:`submit` hands a job over and returns at once; a job still waiting when a newer one arrives is dropped
    (counted in ``skipped``: its forecast is already outdated). A job that raises is counted in ``failed`` and
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
        self._job: Optional[Callable[[], None]] = None
        self._stopping = False
        self._running = 0  # jobs being run: 0, or 1 (2 for a moment while a stopped thread finishes its last job)
        self._generation = 0  # the thread of the current generation is the only one that takes jobs
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the side thread (replacing a job that has not started yet)."""
        with self._condition:
            if self._job is not None:
                self.skipped += 1
            self._job = job
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
                    "pending": int(self._job is not None) + self._running}

    def idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no job is waiting or running; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._job is None and self._running == 0, timeout)

    def _run(self, generation: int) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._job is not None or self._stopping
                                         or self._generation != generation)
                if self._stopping or self._generation != generation:
                    return
                job, self._job = self._job, None
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
        """Drop a waiting job, let the running one finish (up to ``timeout`` s) and end the thread; True when it
        ended."""
        with self._condition:
            if self._job is not None:
                self.skipped += 1
            self._job = None
            self._stopping = True
            self._condition.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()
