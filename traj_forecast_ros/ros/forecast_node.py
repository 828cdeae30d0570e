"""``forecast_node``: a lifecycle node that forecasts dense point trajectories from a camera stream.

    python -m traj_forecast_ros.ros.forecast_node --ros-args --params-file config/forecast.yaml

Lifecycle: ``configure`` loads the model and warms it up; ``activate`` subscribes to the camera and starts the
worker; ``deactivate`` unsubscribes, stops inference and releases the model with its accelerator memory (the next
``activate`` loads it again); ``cleanup`` drops the model and the publishers. With ``autostart`` (default) the node
configures and activates itself at startup. Parameters: :mod:`traj_forecast_ros.ros.params`.

Topics (relative names, so namespaces and remappings apply):
    in:  ``<image_topic>`` (sensor_msgs/Image) or ``<image_topic>/compressed`` (sensor_msgs/CompressedImage),
         ``instruction`` (std_msgs/String), optionally ``<camera_info_topic>`` (sensor_msgs/CameraInfo)
    out: ``~/forecast`` (traj_forecast_msgs/TrajectoryForecast), ``~/markers`` (visualization_msgs/MarkerArray),
         ``~/overlay`` (sensor_msgs/Image), ``/diagnostics`` (diagnostic_msgs/DiagnosticArray, 1 Hz)
Every output carries the source image's header. Markers and overlay are built only while someone subscribes.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from traj_forecast_ros.ros.qos import qos_from_name
from traj_forecast_ros.ros.conversions import (
    compressed_msg_to_rgb,
    image_msg_to_rgb,
)
from traj_forecast_ros.ros.params import PARAMETER_SPECS, PARAMETERS
from traj_forecast_ros.ros.pipeline import (
    ForecastPipeline,
    Frame,
    PipelineStats,
    reason_category,
)
from traj_forecast_ros.ros.outputs import OutputBuilder

try:  # rclpy >= Galactic
    from rclpy.executors import ExternalShutdownException
except ImportError:  # pragma: no cover
    ExternalShutdownException = KeyboardInterrupt  # type: ignore[misc,assignment]

NODE_NAME = "forecast_node"
WEIGHTS_HINT = ("Set the 'model' parameter to a registry name (models/registry.yaml; `traj-forecast download NAME` "
                "fetches it once with network access) or to a model directory (config.yaml + denoiser.safetensors "
                "+ vae.safetensors), then trigger configure again.")


OUTPUT_QOS = qos_from_name("reliable", depth=2)


# ------------------------------------------------------------------------------------------------ diagnostics
def _fmt_ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000.0:.1f}"


def diagnostic_status(name: str, state: str, snapshot: Dict[str, Any], model: Dict[str, str],
                      consecutive_failures: int) -> DiagnosticStatus:
    """One ``DiagnosticStatus`` summarising the node: level, message and key/values from a stats snapshot."""
    values = {
        "state": state,
        "model": model.get("model_id", ""),
        "device": model.get("device", ""),
        "dtype": model.get("dtype", ""),
        "frames_received": str(snapshot["received"]),
        "forecasts_published": str(snapshot["published"]),
        "input_rate_hz": f"{snapshot['input_rate_hz']:.2f}",
        "forecast_rate_hz": f"{snapshot['forecast_rate_hz']:.2f}",
        "latency_p50_ms": _fmt_ms(snapshot["latency_p50_s"]),
        "latency_p95_ms": _fmt_ms(snapshot["latency_p95_s"]),
        "inference_p50_ms": _fmt_ms(snapshot["inference_p50_s"]),
        "inference_p95_ms": _fmt_ms(snapshot["inference_p95_s"]),
        "overhead_p50_ms": _fmt_ms(snapshot["overhead_p50_s"]),
        "overhead_p95_ms": _fmt_ms(snapshot["overhead_p95_s"]),
    }
    # dropped_total counts every frame that got no forecast; rejected_total (bad input) and failed_total (model or
    # publishing failed) are the parts of it that are not just "no time for it" (superseded, too_old).
    reasons = snapshot["not_forecast"]
    totals = {"dropped_total": 0, "rejected_total": 0, "failed_total": 0}
    for reason, count in reasons.items():
        totals["dropped_total"] += count
        category = reason_category(reason)
        if category != "dropped":
            totals[f"{category}_total"] += count
    values.update({key: str(count) for key, count in totals.items()})
    values.update({f"dropped.{reason}": str(count) for reason, count in sorted(reasons.items())})

    if state != "active":
        level, message = DiagnosticStatus.OK, f"{state}: not forecasting"
    elif consecutive_failures >= 3:
        level, message = DiagnosticStatus.ERROR, f"the last {consecutive_failures} forecasts failed"
    elif snapshot["input_rate_hz"] == 0.0 and snapshot["received"] == 0:
        level, message = DiagnosticStatus.WARN, "no images received yet"
    elif snapshot["input_rate_hz"] > 0.0 and snapshot["forecast_rate_hz"] == 0.0 and snapshot["published"] == 0:
        level, message = DiagnosticStatus.WARN, "images arrive but no forecast has been published"
    else:
        level, message = DiagnosticStatus.OK, f"forecasting at {snapshot['forecast_rate_hz']:.2f} Hz"
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=model.get("device", ""))
    status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
    return status


# ------------------------------------------------------------------------------------------------ the node
ForecasterFactory = Callable[[str, str, str, Optional[str]], Any]


def load_forecaster(model: str, device: str, dtype: str, cache_dir: Optional[str]) -> Any:
    """Default factory: ``Forecaster.from_pretrained`` (a registry name or a model directory)."""
    from traj_forecast_ros.forecaster import Forecaster

    return Forecaster.from_pretrained(model, device=device, dtype=dtype, cache_dir=cache_dir)


class ForecastNode(LifecycleNode):
    """Lifecycle node: camera frames in, trajectory forecasts, markers, overlays and diagnostics out.

    Args:
        forecaster_factory: ``(model, device, dtype, cache_dir) -> forecaster`` used at configure; the default
            loads :class:`traj_forecast_ros.forecaster.Forecaster`. Tests inject fakes here.
        **kwargs: passed to ``LifecycleNode`` (``namespace``, ``context``, ``parameter_overrides``, ...).
    """

    def __init__(self, node_name: str = NODE_NAME, *, forecaster_factory: Optional[ForecasterFactory] = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._forecaster_factory = forecaster_factory or load_forecaster
        self.add_on_set_parameters_callback(self._on_set_parameters)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())  # runs _on_set_parameters

        self._forecaster: Any = None
        self._model_info: Dict[str, str] = {}
        self._outputs = OutputBuilder(self.param, warn=lambda text: self.get_logger().warning(
            text, throttle_duration_sec=10.0))
        self._model_lock = threading.Lock()  # one forecaster call at a time; release waits for it
        self._instruction = str(self.get_parameter("instruction").value)
        self._stats = PipelineStats(window=self.param("stats_window"))
        self._pipeline: Optional[ForecastPipeline] = None
        self._camera_info: Optional[CameraInfo] = None
        self._state_label = "unconfigured"
        self._input_subscriptions: List[Any] = []
        self._forecast_pub: Any = None
        self._markers_pub: Any = None
        self._overlay_pub: Any = None
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Wall-clock (steady) period: with use_sim_time a slowed or paused /clock must not slow the diagnostics.
        self._diagnostics_timer = self.create_timer(1.0, self.publish_diagnostics,
                                                    clock=Clock(clock_type=ClockType.STEADY_TIME))

    # ---------------------------------------------------------------- parameters
    def param(self, name: str) -> Any:
        """Current value of a declared parameter."""
        return self.get_parameter(name).value

    def _on_set_parameters(self, parameters: Sequence[Parameter]) -> SetParametersResult:
        problems = []
        for parameter in parameters:
            spec = PARAMETER_SPECS.get(parameter.name)
            if spec is None or parameter.type_ == Parameter.Type.NOT_SET:
                continue
            problem = spec.check(parameter.value)
            if problem:
                problems.append(problem)
        if problems:
            reason = "; ".join(problems)
            self.get_logger().warning(f"rejected parameter change: {reason}")
            return SetParametersResult(successful=False, reason=reason)
        for parameter in parameters:
            if parameter.name == "instruction":
                self._set_instruction(str(parameter.value))
        return SetParametersResult(successful=True)

    def _set_instruction(self, instruction: str) -> None:
        if instruction != getattr(self, "_instruction", instruction):
            self.get_logger().info(f"instruction: '{instruction}'")
        self._instruction = instruction

    # ---------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self._load_model():
            return TransitionCallbackReturn.FAILURE
        self._stats = PipelineStats(window=self.param("stats_window"))
        self._forecast_pub = self.create_lifecycle_publisher(self._forecast_msg_type(), "~/forecast", OUTPUT_QOS)
        self._markers_pub = self.create_lifecycle_publisher(MarkerArray, "~/markers", OUTPUT_QOS)
        self._overlay_pub = self.create_lifecycle_publisher(Image, "~/overlay", OUTPUT_QOS)
        self._state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._forecaster is None and not self._load_model():  # released by an earlier deactivate
            return TransitionCallbackReturn.FAILURE
        transport = self.param("image_transport")
        topic = str(self.param("image_topic"))
        qos = qos_from_name(self.param("qos_reliability"), self.param("qos_depth"))
        if transport == "compressed":
            topic = f"{topic.rstrip('/')}/compressed"
            subscription = self.create_subscription(CompressedImage, topic, self._on_image, qos)
            decode: Callable[[Any], np.ndarray] = self._decode_compressed
        else:
            subscription = self.create_subscription(Image, topic, self._on_image, qos)
            decode = self._decode_raw
        self._input_subscriptions = [
            subscription,
            self.create_subscription(String, self.param("instruction_topic"), self._on_instruction, OUTPUT_QOS),
        ]
        if self.param("camera_info_topic"):
            self._input_subscriptions.append(self.create_subscription(
                CameraInfo, self.param("camera_info_topic"), self._on_camera_info, qos))
        self._pipeline = ForecastPipeline(decode, self._run_forecaster, self._publish_outputs, clock=self._now_s,
                                          max_input_age_s=float(self.param("max_input_age")), stats=self._stats,
                                          logger=self.get_logger())
        self._pipeline.start()
        self._state_label = "active"
        self.get_logger().info(f"forecasting {self.resolve_topic_name(topic)} ({transport}) -> "
                               f"{self.resolve_topic_name('~/forecast')}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_inputs()
        self._release_model()  # waits for a forecast in progress; the next activate loads the model again
        self._state_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_inputs()
        self._release_model()
        for publisher in (self._forecast_pub, self._markers_pub, self._overlay_pub):
            if publisher is not None:
                self.destroy_lifecycle_publisher(publisher)
        self._forecast_pub = self._markers_pub = self._overlay_pub = None
        self._model_info = {}
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_worker(timeout=1.0)
        self._state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def autostart(self) -> bool:
        """Configure then activate; returns True when the node ends up active."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error("autostart: configure failed; the node stays unconfigured (fix the parameters, "
                                    "then trigger configure again)")
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def stop_worker(self, timeout: float) -> bool:
        """Stop subscriptions and the worker, waiting up to ``timeout`` s; True when the worker has exited."""
        self._stop_inputs()
        return self._pipeline.stop(timeout) if self._pipeline is not None else True

    def _load_model(self) -> bool:
        """Load and warm up the model named by the parameters; on failure log why (and how to fix it)."""
        model = str(self.param("model"))
        device, dtype = str(self.param("device")), str(self.param("dtype"))
        self.get_logger().info(f"loading model '{model}' (device {device}, dtype {dtype})")
        try:
            forecaster = self._forecaster_factory(model, device, dtype, self.param("cache_dir") or None)
            forecaster.warmup()
        except FileNotFoundError as exc:  # includes WeightsNotFoundError
            self.get_logger().error(f"cannot load model '{model}': {exc}\n{WEIGHTS_HINT}")
            return False
        except Exception as exc:  # noqa: BLE001 - a broken model must leave the node alive and unconfigured
            self.get_logger().error(f"cannot load model '{model}': {type(exc).__name__}: {exc}")
            return False
        with self._model_lock:
            self._forecaster = forecaster
        config = getattr(forecaster, "config", None)
        self._outputs.model_frame_interval = float(getattr(config, "frame_interval_s", None) or 0.0)
        self._model_info = {"model_id": str(getattr(forecaster, "model_id", model)),
                            "device": str(getattr(forecaster, "device", device)),
                            "dtype": str(getattr(forecaster, "dtype", dtype)).replace("torch.", "")}
        self.get_logger().info(f"model ready: {self._model_info}")
        return True

    def _stop_inputs(self) -> None:
        for subscription in self._input_subscriptions:
            self.destroy_subscription(subscription)
        self._input_subscriptions = []
        if self._pipeline is not None:
            self._pipeline.stop(timeout=None)  # a forecast in progress finishes but is not published

    def _release_model(self) -> None:
        """Free the model and its accelerator memory (``Forecaster.release``) once any forecast in progress ends."""
        with self._model_lock:
            forecaster, self._forecaster = self._forecaster, None
            if forecaster is not None and hasattr(forecaster, "release"):
                try:
                    forecaster.release()
                except Exception as exc:  # noqa: BLE001
                    self.get_logger().warning(f"releasing the model failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _forecast_msg_type() -> Any:
        # Imported here so this module (and its parameter table) loads before the interface package is built.
        from traj_forecast_msgs.msg import TrajectoryForecast

        return TrajectoryForecast

    # ---------------------------------------------------------------- callbacks (executor thread, O(1))
    def _on_image(self, msg: Any) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.submit(Frame(message=msg, stamp_s=stamp))

    def _on_instruction(self, msg: String) -> None:
        if msg.data != self._instruction:
            self.set_parameters([Parameter("instruction", Parameter.Type.STRING, msg.data)])

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---------------------------------------------------------------- worker thread
    def _decode_raw(self, msg: Image) -> np.ndarray:
        return image_msg_to_rgb(msg, max_pixels=int(self.param("max_pixels")))

    def _decode_compressed(self, msg: CompressedImage) -> np.ndarray:
        return compressed_msg_to_rgb(msg, max_pixels=int(self.param("max_pixels")))

    def _run_forecaster(self, rgb: np.ndarray) -> Any:
        seed = int(self.param("seed"))
        with self._model_lock:
            if self._forecaster is None:
                raise RuntimeError("no model loaded (node not configured)")
            # Failures are classified and counted (consecutive_failures included) by ForecastPipeline.process.
            return self._forecaster.forecast(
                rgb, instruction=self._instruction or None, num_samples=int(self.param("num_samples")),
                steps=int(self.param("steps")), seed=None if seed < 0 else seed)

    @property
    def _consecutive_failures(self) -> int:
        """Frames in a row whose forecast or publishing failed (diagnostics turn ERROR at 3); reset by a success."""
        return self._stats.consecutive_failures

    def _output_header(self, header: Header) -> Header:
        camera_frame = self.param("camera_frame")
        if header.frame_id or not camera_frame:
            return header
        return Header(stamp=header.stamp, frame_id=camera_frame)

    def _publish_outputs(self, frame: Frame, rgb: np.ndarray, forecast: Any) -> None:
        header = self._output_header(frame.message.header)
        self._forecast_pub.publish(self._outputs.forecast_msg(forecast, header))
        if self._markers_pub.get_subscription_count() > 0:
            self._markers_pub.publish(self._outputs.markers(forecast, header, self._camera_info,
                                                            self._stats.forecast_rate.period()))
        if self._overlay_pub.get_subscription_count() > 0:
            self._overlay_pub.publish(self._outputs.overlay(forecast, rgb, header))

    # ---------------------------------------------------------------- diagnostics (executor thread)
    def publish_diagnostics(self) -> None:
        """Publish the node's status on /diagnostics (called by a 1 Hz timer)."""
        status = diagnostic_status(f"{self.get_fully_qualified_name()}: trajectory forecast", self._state_label,
                                   self._stats.snapshot(), self._model_info, self._consecutive_failures)
        array_msg = DiagnosticArray(status=[status])
        array_msg.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(array_msg)


def main(args: Optional[List[str]] = None) -> int:
    """Entry point of ``forecast_node`` (console script and ``python -m traj_forecast_ros.ros.forecast_node``)."""
    rclpy.init(args=args)
    node: Optional[ForecastNode] = None
    exit_code = 0
    try:
        node = ForecastNode()
        if node.param("autostart"):
            node.autostart()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001 - invalid parameters at startup: say why and exit non-zero
        print(f"forecast_node: {type(exc).__name__}: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        worker_exited = True
        if node is not None:
            worker_exited = node.stop_worker(timeout=0.5)  # never wait for a long forecast
            node.destroy_node()
        rclpy.try_shutdown()
    if not worker_exited:
        # The worker is still inside a forecast (native torch code). Finalising the interpreter under it can abort
        # ("terminate called without an active exception"), so leave now: ROS is already shut down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
