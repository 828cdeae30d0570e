"""``example_planner``: the documented way to consume forecasts, as a small node a planner can start from.

    python -m traj_forecast_ros.ros.example_planner --ros-args -p forecast_topic:=/forecast_node/forecast

It subscribes to ``TrajectoryForecast`` and publishes, per forecast, two ``mono8`` images of the source camera's
size with the forecast's header (so they overlay the camera image):

- ``~/motion_probability``: 255 x the probability that the scene at that pixel moves within the forecast (the
  message's ``moving_fraction`` of the nearest query point; the samples are equally likely);
- ``~/keep_out``: 255 where the scene is expected to start moving within ``horizon_s`` seconds (``first_move_frame``
  x ``frame_interval`` <= ``horizon_s``), 0 elsewhere: a region a planner keeps the robot's tools out of.

Pixels outside the message's ``crop_box`` (the part of a non-square image the model does not see) are 0. It reads
the message only through :func:`traj_forecast_ros.ros.conversions.msg_to_arrays` and the summaries the forecast node
computed once; it never touches the K x T tracks.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image
from traj_forecast_msgs.msg import TrajectoryForecast

from traj_forecast_ros.ros.conversions import msg_to_arrays

NODE_NAME = "example_planner"


def grid_to_image(grid: np.ndarray, crop_box: Tuple[float, float, float, float], image_size: Tuple[int, int]
                  ) -> np.ndarray:
    """``[H, W]`` values of the query grid spread over an image of ``image_size`` (height, width): every pixel of
    ``crop_box`` takes the value of the grid cell it lies in, pixels outside the box are 0."""
    height, width = image_size
    rows, cols = grid.shape
    x_min, y_min, x_max, y_max = crop_box
    centres_x = np.arange(width) + 0.5  # pixel centres, in the message's coordinates
    centres_y = np.arange(height) + 0.5
    col = np.floor((centres_x - x_min) * cols / max(x_max - x_min, 1e-9)).astype(np.int64)  # [width]
    row = np.floor((centres_y - y_min) * rows / max(y_max - y_min, 1e-9)).astype(np.int64)  # [height]
    inside_x = (col >= 0) & (col < cols)
    inside_y = (row >= 0) & (row < rows)
    image = grid[np.clip(row, 0, rows - 1)[:, None], np.clip(col, 0, cols - 1)[None, :]]  # [height, width]
    return np.where(inside_y[:, None] & inside_x[None, :], image, 0)


def planner_maps(msg: Any, horizon_s: float) -> Dict[str, np.ndarray]:
    """The two ``[height, width]`` uint8 maps of a ``TrajectoryForecast``: ``motion_probability`` (0..255) and
    ``keep_out`` (0 or 255, points expected to start moving within ``horizon_s``; the whole forecast when
    ``horizon_s`` is 0 or the message's ``frame_interval`` is unknown)."""
    arrays = msg_to_arrays(msg)
    size = (int(msg.image_height), int(msg.image_width))
    crop_box = tuple(float(v) for v in arrays["crop_box"])
    first = arrays["first_move_frame"]  # [H, W] frames, -1 = not expected to move
    expected = first >= 0
    if horizon_s > 0 and msg.frame_interval > 0:
        expected &= first * float(msg.frame_interval) <= horizon_s
    probability = np.rint(np.clip(arrays["moving_fraction"], 0.0, 1.0) * 255).astype(np.uint8)
    return {"motion_probability": grid_to_image(probability, crop_box, size),
            "keep_out": grid_to_image(expected.astype(np.uint8) * np.uint8(255), crop_box, size)}


def mono8_msg(pixels: np.ndarray, header: Any) -> Image:
    """A ``sensor_msgs/Image`` (mono8) of ``[H, W]`` uint8 ``pixels``."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    msg = Image(header=header, height=int(pixels.shape[0]), width=int(pixels.shape[1]), encoding="mono8",
                is_bigendian=0, step=int(pixels.shape[1]))
    msg.data = pixels.tobytes()
    return msg


class ExamplePlanner(Node):
    """Forecast in, motion-probability and keep-out images out (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        topic = self.declare_parameter("forecast_topic", "forecast_node/forecast").value
        self.declare_parameter("horizon_s", 1.0)
        self._probability_pub = self.create_publisher(Image, "~/motion_probability", 2)
        self._keep_out_pub = self.create_publisher(Image, "~/keep_out", 2)
        self._warned_unknown_interval = False
        self.create_subscription(TrajectoryForecast, topic, self.on_forecast, 2)
        self.get_logger().info(f"planning from {self.resolve_topic_name(topic)} -> "
                               f"{self.resolve_topic_name('~/motion_probability')}, "
                               f"{self.resolve_topic_name('~/keep_out')}")

    def on_forecast(self, msg: Any) -> None:
        """Publish both maps of one forecast."""
        horizon_s = float(self.get_parameter("horizon_s").value)
        if horizon_s > 0 and msg.frame_interval <= 0 and not self._warned_unknown_interval:
            self._warned_unknown_interval = True
            self.get_logger().warning(f"model '{msg.model_id}' states no frame_interval: keep_out covers the whole "
                                      "forecast, not horizon_s (set the forecast node's frame_interval parameter)")
        maps = planner_maps(msg, horizon_s)
        self._probability_pub.publish(mono8_msg(maps["motion_probability"], msg.header))
        self._keep_out_pub.publish(mono8_msg(maps["keep_out"], msg.header))


def main(args: Optional[List[str]] = None) -> int:
    """Entry point of ``example_planner``; exits 0 on SIGINT or SIGTERM."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.ALL)
    executor = SingleThreadedExecutor()  # before the node: a signal while it starts leaves a valid executor to stop
    node: Optional[ExamplePlanner] = None
    try:
        node = ExamplePlanner()
        executor.add_node(node)
        executor.spin()  # returns at once when a signal already shut ROS down
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C, or ROS shut down from outside (SIGTERM): a normal stop
    except Exception:  # noqa: BLE001 - see below
        if rclpy.ok():
            raise
        # the signal shut ROS down while the executor was between two waits (rclpy then fails to build its wait
        # set): a normal stop too
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
