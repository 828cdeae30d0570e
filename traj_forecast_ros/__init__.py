"""traj_forecast_ros: dense point-trajectory forecasting ("What Happens Next?") for ROS 2.

The core (``model/``, ``forecaster``) has no ROS dependency; ``forecast_node`` and ``conversions`` are the ROS edge.
Import :class:`traj_forecast_ros.forecaster.Forecaster` for the Python API.
"""

__version__ = "0.1.0"
