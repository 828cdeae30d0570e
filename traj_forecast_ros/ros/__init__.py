"""The ROS 2 edge: the lifecycle forecast node and what it needs (the only package besides ``bag`` that imports rclpy).

- :mod:`.forecast_node`: the lifecycle node (subscriptions, publishers, transitions, diagnostics).
- :mod:`.params`: the node's parameters, their ranges and validation.
- :mod:`.validation`: checks made when a parameter is set, and log-safe user text.
- :mod:`.diagnostics`: the ``/diagnostics`` status built from the pipeline's statistics.
- :mod:`.pipeline`: the one-slot mailbox, the worker loop and the frame counters (no rclpy).
- :mod:`.conversions`: Image/CompressedImage <-> numpy, ``Forecast`` -> ``TrajectoryForecast``.
- :mod:`.outputs`: builds the forecast message, markers and overlay for one forecast.
- :mod:`.markers`: RViz markers of the forecast tracks.
- :mod:`.qos`: QoS profiles by name and ROS message classes by type name.
"""
