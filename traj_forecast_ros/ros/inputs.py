"""The cameras' subscriptions: image (the input table's message type for the camera's transport), CameraInfo and
an optional per-camera instruction, plus the node's own instruction topic. Each camera's latest CameraInfo and
instruction are kept here; callbacks only store or hand over (O(1))."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

from rclpy.qos import QoSProfile
from std_msgs.msg import String

from traj_forecast_ros.ros.cameras import CameraConfig
from traj_forecast_ros.ros.io_tables import CAMERA_INFO_MSGTYPE, INPUTS, OUTPUT_QOS
from traj_forecast_ros.ros.qos import message_class

ImageCallback = Callable[[CameraConfig, Any], None]  # (camera, image message)


class CameraInputs:
    """Creates and destroys the subscriptions of a set of cameras on ``node``."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self.subscriptions: List[Any] = []
        self.camera_info: Dict[str, Any] = {}  # camera -> its latest CameraInfo
        self.instructions: Dict[str, str] = {}  # camera -> the instruction its own topic set last
        self._lock = threading.Lock()

    def subscribe(self, cameras: Sequence[CameraConfig], image_qos: QoSProfile, instruction_topic: str,
                  on_image: ImageCallback, on_node_instruction: Callable[[String], None]) -> None:
        """Subscribe every camera. Each subscription is recorded as soon as it exists, so a failure part-way leaves
        only subscriptions :meth:`unsubscribe` finds. The instructions come first: an executor serves ready
        subscriptions in creation order, so an instruction that arrived before a frame is applied before that frame
        is bound to the instruction in force."""
        self._add(String, instruction_topic, on_node_instruction, OUTPUT_QOS)
        for camera in cameras:
            if camera.instruction_topic:
                self._add(String, camera.instruction_topic, self._instruction_setter(camera.name), OUTPUT_QOS)
        for camera in cameras:
            image_type = message_class(INPUTS[camera.transport].msgtype)
            self._add(image_type, camera.subscribed_topic, lambda msg, camera=camera: on_image(camera, msg), image_qos)
            if camera.camera_info_topic:
                self._add(message_class(CAMERA_INFO_MSGTYPE), camera.camera_info_topic,
                          self._camera_info_setter(camera.name), image_qos)

    def unsubscribe(self) -> None:
        """Destroy the subscriptions (a failing one stays listed for the next attempt)."""
        while self.subscriptions:
            self._node.destroy_subscription(self.subscriptions[-1])
            self.subscriptions.pop()

    def instruction(self, camera: str) -> Optional[str]:
        """The instruction ``camera``'s own topic set last (None: it has none, the node's applies)."""
        with self._lock:
            return self.instructions.get(camera)

    def _add(self, msg_type: Any, topic: str, callback: Callable[[Any], None], qos: QoSProfile) -> None:
        self.subscriptions.append(self._node.create_subscription(msg_type, topic, callback, qos))

    def _instruction_setter(self, camera: str) -> Callable[[String], None]:
        def store(msg: String) -> None:
            with self._lock:
                self.instructions[camera] = msg.data

        return store

    def _camera_info_setter(self, camera: str) -> Callable[[Any], None]:
        def store(msg: Any) -> None:
            self.camera_info[camera] = msg

        return store
