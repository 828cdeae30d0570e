"""Planner-side example: subscribe to the forecast node and read a TrajectoryForecast as numpy arrays.

    python docs/examples/forecast_subscriber.py --ros-args -p topic:=/forecast_node/forecast

Needs only rclpy, numpy and the traj_forecast_msgs interface package (not traj_forecast_ros itself).
"""

from typing import Dict

import numpy as np
import rclpy
from rclpy.node import Node
from traj_forecast_msgs.msg import TrajectoryForecast


def forecast_arrays(msg: TrajectoryForecast) -> Dict[str, np.ndarray]:
    """The message's flat float32 arrays reshaped (row-major, as documented in TrajectoryForecast.msg)."""
    k, t, h, w = msg.num_samples, msg.num_frames, msg.grid_rows, msg.grid_cols
    return {
        "tracks": np.asarray(msg.tracks, dtype=np.float32).reshape(k, t, h, w, 2),  # (x, y) source pixels
        "query_points": np.asarray(msg.query_points, dtype=np.float32).reshape(h, w, 2),
        "mean_displacement": np.asarray(msg.mean_displacement, dtype=np.float32).reshape(h, w, 2),
        "spread": np.asarray(msg.spread, dtype=np.float32).reshape(h, w),
        "moving_fraction": np.asarray(msg.moving_fraction, dtype=np.float32).reshape(h, w),
    }


def summarise(msg: TrajectoryForecast, moving_probability: float = 0.5) -> Dict[str, float]:
    """What a planner might ask: which image regions will move, how far, and how sure the model is."""
    arrays = forecast_arrays(msg)
    will_move = arrays["moving_fraction"] >= moving_probability  # [H, W] bool
    displacement = np.linalg.norm(arrays["mean_displacement"], axis=-1)  # [H, W] px
    return {
        "stamp": msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9,
        "moving_points": int(will_move.sum()),
        "grid_points": int(will_move.size),
        "max_mean_displacement_px": float(displacement.max()),
        "median_spread_px": float(np.median(arrays["spread"])),
        "horizon_s": msg.frame_interval * (msg.num_frames - 1),  # 0 when the model's frame rate is unknown
    }


class ForecastListener(Node):
    """Logs a one-line summary of every forecast."""

    def __init__(self) -> None:
        super().__init__("forecast_listener")
        topic = self.declare_parameter("topic", "/forecast_node/forecast").value
        self.create_subscription(TrajectoryForecast, topic, self.on_forecast, 10)

    def on_forecast(self, msg: TrajectoryForecast) -> None:
        summary = summarise(msg)
        self.get_logger().info(
            f"{msg.header.frame_id} @ {summary['stamp']:.3f}: {summary['moving_points']}/{summary['grid_points']} "
            f"points will move, up to {summary['max_mean_displacement_px']:.1f} px "
            f"(median spread {summary['median_spread_px']:.1f} px)")


def main() -> None:
    rclpy.init()
    node = ForecastListener()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
