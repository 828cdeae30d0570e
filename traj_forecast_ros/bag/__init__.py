"""rosbag2 tools built on rosbags (sqlite3 and MCAP storage), used by ``traj-forecast bag ...``.

- :mod:`.typestore`: message definitions (installed ROS interfaces + ``traj_forecast_msgs``).
- :mod:`.io`: read, write and describe bags (no ROS needed).
- :mod:`.sample`: the bundled sample bag of real LIBERO frames.
- :mod:`.player`: publish a bag over rclpy at the recorded pace (``/clock`` optional).
- :mod:`.offline`: forecast every image of a bag into a new bag, deterministically (``bag run``).
- :mod:`.replay`: bag -> forecast node process over DDS -> recorded outputs + summary (``bag replay``, the demo).
- :mod:`.report`: read forecasts back, latency statistics, the animated overlay.
- :mod:`.model_choice`: the best model available offline.

The recorder node lives in :mod:`traj_forecast_ros.bag.recorder`.
"""
