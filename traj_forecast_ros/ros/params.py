"""The forecast node's parameters in one table: name, default, description, range or choices.

Per-camera parameters (``<camera>.<field>``, for the names in ``cameras``) are in :mod:`.cameras`. The table feeds the ROS parameter declarations (descriptions and ranges shown by ``ros2 param describe``), the
validation of every change (invalid values are refused with a reason) and the test that ``config/forecast.yaml``
sets exactly these parameters. No rclpy import here except the descriptor messages.
"""

from __future__ import annotations

from typing import Dict, Tuple

from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.geometry import DEFAULT_MAX_PIXELS
from traj_forecast_ros.ros.io_tables import TRANSPORTS
from traj_forecast_ros.ros.settings import ParamSpec, Settings  # noqa: F401 - ParamSpec: this table's row type
from traj_forecast_ros.summaries import DEFAULT_MOVING_THRESHOLD_PX


PARAMETERS: Tuple[ParamSpec, ...] = (
    ParamSpec("autostart", True, "Configure and activate at startup (otherwise wait for lifecycle transitions)."),
    ParamSpec("model", "libero-atm", "Registry name (models/registry.yaml) or model directory. Applies at configure "
              "(an activate after a deactivate reloads the configured model; a new one needs cleanup + configure)."),
    ParamSpec("device", "auto", "Compute device: auto (GPU when available), cpu, cuda or cuda:N. "
              "Applies at configure.", pattern=r"auto|cpu|cuda(:\d+)?"),
    ParamSpec("dtype", "auto", "Compute dtype: auto (bfloat16 on GPUs with native bfloat16, else float16; float32 "
              "on CPU), float32, float16, bfloat16. A non-finite half-precision forecast is rerun in float32 "
              "(fp32_fallbacks in /diagnostics). Applies at configure.",
              choices=("auto", "float32", "float16", "bfloat16")),
    ParamSpec("use_cuda_graphs", False, "Replay captured CUDA graphs of the denoiser, one per K (CUDA only; off "
              "until bench/gpu_check.py passes on a real GPU). Applies at configure."),
    ParamSpec("compile", False, "Run the denoiser through torch.compile (the first forecast per dtype compiles for "
              "tens of seconds; off until bench/gpu_check.py passes on a real GPU). Applies at configure."),
    ParamSpec("graph_cache_size", 4, "CUDA graphs kept (least recently used dropped first, with their GPU memory); "
              "one per distinct num_samples. Applies at configure.", 1, 64),
    ParamSpec("cache_dir", "", "Where registry models are looked up ('' = the default cache). Applies at configure."),
    ParamSpec("threads", 0, "Torch intra-op CPU threads (0 = the cores available to the process). Applies at "
              "configure; the CPU sampling plan is chosen for this count.", 0, 1024),
    ParamSpec("num_samples", DEFAULT_NUM_SAMPLES, "K, sampled futures per frame.", 1, 64),
    ParamSpec("steps", 0, "Flow-matching Euler time points per forecast (10 = 9 denoiser evaluations); 0 = the "
              "model's default_steps (10 for LIBERO, the official setting).", 2, 200, model_default=0),
    ParamSpec("guidance_scale", -1.0, "Classifier-free guidance of the instruction (1 = none; -1 = the model's "
              "guidance_scale). Values other than 1 need a model trained with instruction dropout (not LIBERO): "
              "refused for other models. Applies to the next frame.", 0.0, 20.0, model_default=-1.0),
    ParamSpec("seed", -1, "Noise seed: -1 = fresh noise for every frame (as seed=-1 or None in the Python API), "
              ">= 0 = the same noise every frame.",
              -1, 2**31 - 1),
    ParamSpec("instruction", "", "Task instruction for language-conditioned models ('' = the model's default). "
              "Also set by the instruction topic."),
    ParamSpec("image_topic", "image", "Camera topic of the single-camera setup (the compressed transport subscribes "
              "to <image_topic>/compressed; ignored when 'cameras' names cameras). Applies at activate."),
    ParamSpec("image_transport", "raw", "raw (sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage), for "
              "image_topic. Applies at activate.", choices=TRANSPORTS),
    ParamSpec("instruction_topic", "instruction", "std_msgs/String topic that changes the instruction at run time "
              "(reliable, volatile). Applies at activate."),
    ParamSpec("camera_info_topic", "", "sensor_msgs/CameraInfo topic for the marker image plane ('' = use "
              "marker_pixel_size). Applies at activate."),
    ParamSpec("qos_reliability", "best_effort", "Camera subscription reliability (best_effort = sensor data QoS; "
              "reliable also matches reliable-only publishers). Applies at activate.",
              choices=("best_effort", "reliable")),
    ParamSpec("qos_depth", 5, "Camera subscription queue depth. Applies at activate.", 1, 100),
    ParamSpec("max_input_age", 1.0, "Drop frames older than this many seconds (header stamp vs node clock) when the "
              "worker takes them; 0 disables. Applies to the next frame.", 0.0, 3600.0),
    ParamSpec("max_clock_skew", 1.0, "Reject frames stamped more than this many seconds ahead of the node clock "
              "(counted as future_stamp): a sender clock ahead of ours would otherwise corrupt the latency figures. "
              "0 is strict (any frame stamped ahead is rejected), unlike max_input_age where 0 disables. Applies to "
              "the next frame.",
              0.0, 3600.0),
    ParamSpec("max_pixels", DEFAULT_MAX_PIXELS, "Reject images with more pixels than this (rejected.too_large): the "
              "one size limit, for raw and compressed frames and the forecaster alike.", 1, 2**28),
    ParamSpec("frame_interval", 0.0, "Seconds between forecast frames written to the message (0 = the model's own "
              "value, its config's frame_interval_s; a model that states none publishes 0 = unknown).", 0.0, 60.0),
    ParamSpec("moving_threshold", DEFAULT_MOVING_THRESHOLD_PX, "Pixels a point must move from frame 0 (in a sample) to count as moving: "
              "moving_fraction and first_move_frame; carried in the message.", 0.0, 10000.0),
    ParamSpec("camera_frame", "", "frame_id used when an image header has none ('' = keep the header as is)."),
    ParamSpec("marker_stride", 8, "Markers: draw every Nth query point in each grid direction.", 1, 256),
    ParamSpec("marker_max_frames", 0, "Markers: draw at most this many forecast frames per track, evenly spaced, "
              "the first and the last always among them (0 = all).", 0, 1000),
    ParamSpec("marker_samples", 0, "Markers: draw at most this many samples (0 = all).", 0, 64),
    ParamSpec("marker_plane_depth", 1.0, "Markers: metres from the camera to the image plane they are drawn on.",
              0.01, 100.0),
    ParamSpec("marker_pixel_size", 0.002, "Markers: metres per pixel on that plane (used without CameraInfo).",
              1e-6, 1.0),
    ParamSpec("marker_line_width", 0.003, "Markers: line width in metres.", 1e-5, 1.0),
    ParamSpec("marker_lifetime_periods", 3.0, "Markers: lifetime in forecast periods (0 = forever).", 0.0, 1000.0),
    ParamSpec("overlay_stride", 4, "Overlay: draw every Nth query point in each grid direction.", 1, 256),
    ParamSpec("overlay_sample", 0, "Overlay: which sample to draw (clamped to K-1).", 0, 63),
    ParamSpec("max_batch_cameras", 0, "At most this many cameras' frames in one batched forecaster call (0 = every "
              "camera with a frame waiting; cameras are served round-robin either way). Applies at activate.",
              0, 64),
    ParamSpec("stats_window", 200, "Forecasts kept for the latency percentiles in /diagnostics. Applies at "
              "configure.", 10, 100000),
)
PARAMETER_SPECS: Dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}


def default_settings() -> Settings:
    """The parameter table's defaults as a snapshot (``bag run`` and tests; the node snapshots its live values)."""
    return Settings({spec.name: spec.default for spec in PARAMETERS})
