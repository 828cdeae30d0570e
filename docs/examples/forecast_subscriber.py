"""Planner-side example: subscribe to the forecast node and read a TrajectoryForecast as numpy arrays.

    python docs/examples/forecast_subscriber.py --ros-args -p topic:=/forecast_node/forecast

Needs rclpy, numpy, the traj_forecast_msgs interface package and traj_forecast_ros (for its one unpacking helper,
``traj_forecast_ros.ros.conversions.msg_to_arrays``). Exits 0 on Ctrl-C (SIGINT) and on SIGTERM.
"""

import sys
from typing import Dict, List, Optional

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from traj_forecast_msgs.msg import TrajectoryForecast

from traj_forecast_ros.ros.conversions import msg_to_arrays


def summarise(msg: TrajectoryForecast, moving_probability: float = 0.5) -> Dict[str, float]:
    """What a planner might ask: which image regions will move, when, how far, and how sure the model is."""
    arrays = msg_to_arrays(msg)  # every array of the message, reshaped (numpy views, no copy)
    will_move = arrays["moving_fraction"] >= moving_probability  # [H, W] bool: P(moves) over the samples
    starts = arrays["first_move_frame"][will_move]  # frames; -1 = not expected to move
    displacement = np.linalg.norm(arrays["mean_displacement"], axis=-1)  # [H, W] px
    return {
        "stamp": msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9,
        "moving_points": int(will_move.sum()),
        "grid_points": int(will_move.size),
        "first_move_s": float(starts.min() * msg.frame_interval) if starts.size else -1.0,
        "max_mean_displacement_px": float(displacement.max()),
        "median_spread_px": float(np.median(arrays["spread"])),  # at the last frame; per frame: spread_per_frame
        "horizon_s": msg.frame_interval * (msg.num_frames - 1),  # 0 when the model's frame rate is unknown
    }


class ForecastListener(Node):
    """Logs a one-line summary of every forecast."""

    def __init__(self) -> None:
        super().__init__("forecast_listener")
        topic = self.declare_parameter("topic", "/forecast_node/forecast").value
        self.create_subscription(TrajectoryForecast, topic, self.on_forecast, 10)
        self.get_logger().info(f"listening to {self.resolve_topic_name(topic)}")

    def on_forecast(self, msg: TrajectoryForecast) -> None:
        summary = summarise(msg)
        self.get_logger().info(
            f"{msg.header.frame_id} @ {summary['stamp']:.3f}: {summary['moving_points']}/{summary['grid_points']} "
            f"points will move (first after {summary['first_move_s']:.2f} s), up to "
            f"{summary['max_mean_displacement_px']:.1f} px (median spread {summary['median_spread_px']:.1f} px)")


def main(args: Optional[List[str]] = None) -> int:
    """Spin until Ctrl-C or SIGTERM (both end with exit code 0)."""
    rclpy.init(args=args)
    executor = SingleThreadedExecutor()  # before the node: a signal while it starts leaves a valid executor to stop
    node: Optional[ForecastListener] = None
    try:
        node = ForecastListener()  # inside the try: a Ctrl-C while it starts is a normal stop too
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
