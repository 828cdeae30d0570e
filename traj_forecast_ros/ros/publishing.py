"""Each camera's output publishers (one per row of the output table) and the publishing of one forecast.

:meth:`CameraPublishers.publish` is a function of (frame, forecast, snapshot): the forecast goes out on the worker
thread; the on-demand outputs (markers, overlay), only while someone subscribes, are built on the side-output thread
(the newest job per camera), so the next frames' forecast starts meanwhile.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from std_msgs.msg import Header

from traj_forecast_ros.ros.cameras import camera_parameter
from traj_forecast_ros.ros.io_tables import OUTPUTS, OutputSpec, output_topic
from traj_forecast_ros.ros.outputs import OutputBuilder, OutputJob, SideOutputs
from traj_forecast_ros.ros.pipeline import Frame
from traj_forecast_ros.ros.qos import message_class
from traj_forecast_ros.ros.settings import Settings


def output_header(frame: Frame, settings: Settings) -> Any:
    """The source image's header; a header without frame_id gets the camera's ``camera_frame`` (its own, else the
    node's) when one is set."""
    header = frame.message.header
    camera_frame = str(settings.get(camera_parameter(frame.camera, "camera_frame"), "") or "") if frame.camera else ""
    camera_frame = camera_frame or str(settings["camera_frame"])
    if header.frame_id or not camera_frame:
        return header
    return Header(stamp=header.stamp, frame_id=camera_frame)


class CameraPublishers:
    """The lifecycle publishers of every camera's outputs, created at configure and destroyed at cleanup.

    Args:
        node: the lifecycle node that owns the publishers.
        builder: builds the outputs (one for the node: it holds the marker serialiser's choice of path).
        side_outputs: the thread that builds and publishes the on-demand outputs.
        period: camera -> median seconds between its forecasts (marker lifetime), None when unknown.
    """

    def __init__(self, node: Any, builder: OutputBuilder, side_outputs: SideOutputs,
                 period: Callable[[str], Optional[float]]) -> None:
        self._node = node
        self.builder = builder
        self.side_outputs = side_outputs
        self._period = period
        self.model_frame_interval = 0.0  # the loaded model's seconds between forecast frames (set at load)
        self._publishers: Dict[str, Dict[str, Any]] = {}  # camera -> output name -> publisher
        self._lock = threading.Lock()  # side-output publishes vs destroying the publishers

    @property
    def cameras(self) -> List[str]:
        """The cameras that have publishers."""
        return list(self._publishers)

    def publisher(self, camera: str, output: str) -> Any:
        """The publisher of ``camera``'s ``output`` (KeyError when there is none)."""
        return self._publishers[camera][output]

    def create(self, cameras: Sequence[str]) -> None:
        """One publisher per camera and output of the table; each is recorded as soon as it exists, so a failure
        part-way leaves only publishers :meth:`destroy` finds."""
        for camera in cameras:
            self._publishers.setdefault(camera, {})
            for spec in OUTPUTS:
                self._publishers[camera][spec.name] = self._node.create_lifecycle_publisher(
                    message_class(spec.msgtype), output_topic(camera, spec.name), spec.qos)

    def destroy(self) -> None:
        """Destroy every publisher (waiting for a side-output publish in progress)."""
        with self._lock:
            publishers, self._publishers = self._publishers, {}
            for by_output in publishers.values():
                for publisher in by_output.values():
                    self._node.destroy_lifecycle_publisher(publisher)

    def publish(self, frame: Frame, forecast: Any, settings: Settings) -> None:
        """Publish ``frame``'s forecast with ``settings``, and hand its wanted on-demand outputs to the side thread."""
        publishers = self._publishers[frame.camera]
        job = OutputJob(forecast, frame.rgb, output_header(frame, settings), settings, frame.camera_info,
                        model_frame_interval=self.model_frame_interval)
        wanted: List[Tuple[OutputSpec, Any]] = []
        for spec in OUTPUTS:
            publisher = publishers[spec.name]
            if not spec.on_demand:
                publisher.publish(spec.build(self.builder, job))
            elif publisher.get_subscription_count() > 0:
                wanted.append((spec, publisher))
        if wanted:  # the marker lifetime (the camera's forecast period) only for them: not on every frame
            job = dataclasses.replace(job, period_s=self._period(frame.camera))
            self.side_outputs.submit(lambda: self._publish_on_demand(frame.camera, publishers, wanted, job),
                                     key=frame.camera)

    def _publish_on_demand(self, camera: str, publishers: Dict[str, Any], wanted: List[Tuple[OutputSpec, Any]],
                           job: OutputJob) -> None:
        if self._publishers.get(camera) is not publishers:  # torn down (or reconfigured) since: nothing to build
            return
        messages = [(publisher, spec.build(self.builder, job)) for spec, publisher in wanted]
        with self._lock:  # publish only on publishers that still exist
            if self._publishers.get(camera) is not publishers:
                return
            for publisher, message in messages:
                publisher.publish(message)
