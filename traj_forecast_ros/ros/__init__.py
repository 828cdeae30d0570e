"""The ROS 2 edge: the lifecycle forecast node and what it needs (the only package besides ``bag`` that imports rclpy).

By job:
- node: :mod:`.forecast_node` (lifecycle transitions, parameter callback, diagnostics timer).
- parameters and snapshot: :mod:`.params` (the table), :mod:`.settings` (the immutable per-frame snapshot),
  :mod:`.validation` (checks made when a value is set; log-safe user text).
- cameras and inputs: :mod:`.cameras` (the ``cameras`` scheme), :mod:`.inputs` (subscriptions),
  :mod:`.io_tables` (the input and output tables), :mod:`.conversions` (messages <-> numpy).
- forecasting: :mod:`.pipeline` (worker, frame accounting; no rclpy), :mod:`.scheduler` (per-camera mailboxes,
  round-robin), :mod:`.batching` (one ``forecast_batch`` call), :mod:`.model_loading` (the one model).
- outputs and publishing: :mod:`.outputs` (builders, side-output thread), :mod:`.publishing` (per-camera publishers),
  :mod:`.markers` (RViz markers), :mod:`.qos`.
- diagnostics: :mod:`.stats` (counters, rates, latencies per camera and in total), :mod:`.diagnostics`.
"""
