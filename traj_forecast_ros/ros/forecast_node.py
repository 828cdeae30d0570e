"""``forecast_node``: a lifecycle node that forecasts dense point trajectories from a camera stream.

    python -m traj_forecast_ros.ros.forecast_node --ros-args --params-file config/forecast.yaml

Lifecycle: ``configure`` loads the model and warms it up; ``activate`` subscribes to the camera and starts the
worker; ``deactivate`` unsubscribes, stops inference and releases the model with its accelerator memory (the next
``activate`` loads the same model again: ``model``, ``device``, ``dtype``, ``threads`` and the other load parameters
are read at configure only); ``cleanup`` drops the model and the publishers. With ``autostart`` (default) the node
configures and activates itself at startup. Parameters: :mod:`traj_forecast_ros.ros.params`.

Topics (relative names, so namespaces and remappings apply):
    in:  ``<image_topic>`` (sensor_msgs/Image) or ``<image_topic>/compressed`` (sensor_msgs/CompressedImage),
         ``instruction`` (std_msgs/String), optionally ``<camera_info_topic>`` (sensor_msgs/CameraInfo)
    out: ``~/forecast`` (traj_forecast_msgs/TrajectoryForecast), ``~/markers`` (visualization_msgs/MarkerArray),
         ``~/overlay`` (sensor_msgs/Image), ``/diagnostics`` (diagnostic_msgs/DiagnosticArray, 1 Hz)
Every output carries the source image's header. Markers and overlay are built only while someone subscribes.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from traj_forecast_ros.geometry import MIN_IMAGE_SIDE
from traj_forecast_ros.ros.qos import qos_from_name
from traj_forecast_ros.ros.conversions import (
    compressed_msg_to_rgb,
    image_msg_to_rgb,
)
from traj_forecast_ros.ros.diagnostics import diagnostic_status
from traj_forecast_ros.ros.model_loading import (  # noqa: F401 - load_forecaster is the default factory (bench too)
    LOAD_PARAMETERS,
    ForecasterFactory,
    guidance_problem,
    load_forecaster,
    model_takes_instruction,
)
from traj_forecast_ros.ros.params import PARAMETER_SPECS, PARAMETERS
from traj_forecast_ros.ros.pipeline import ForecastPipeline, Frame, PipelineStats
from traj_forecast_ros.ros.outputs import OutputBuilder, SideOutputs
from traj_forecast_ros.ros.validation import (
    TOPIC_PARAMETERS,
    device_problem,
    loggable_text,
    missing_model_message,
    model_problem,
    topic_name_problem,
)


NODE_NAME = "forecast_node"


class TransitionFailed(Exception):
    """A lifecycle transition cannot complete; the message says why (logged and shown in /diagnostics)."""


OUTPUT_QOS = qos_from_name("reliable", depth=2)
WORKER_JOIN_S = 0.5  # a transition waits this long for a cancelled forecast, then releases the model in background
# A load waits this long for the previous model's background release (its cancelled forecast unwinding, usually one
# denoiser step). A model still unwinding after it (a forecaster that ignores the cancel flag) fails configure/activate
# with that reason, rolled back, rather than block the executor or hold two models in accelerator memory at once.
RELEASE_WAIT_S = 2.0


# ------------------------------------------------------------------------------------------------ the node
class ForecastNode(LifecycleNode):
    """Lifecycle node: camera frames in, trajectory forecasts, markers, overlays and diagnostics out.

    Args:
        forecaster_factory: ``(model, device, dtype, cache_dir, use_cuda_graphs=, compile=, graph_cache_size=)
            -> forecaster`` used at configure; the default
            loads :class:`traj_forecast_ros.forecaster.Forecaster`. Tests inject fakes here.
        **kwargs: passed to ``LifecycleNode`` (``namespace``, ``context``, ``parameter_overrides``, ...).
    """

    def __init__(self, node_name: str = NODE_NAME, *, forecaster_factory: Optional[ForecasterFactory] = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._forecaster_factory = forecaster_factory or load_forecaster
        self._declared = False  # model/device are checked against this machine only for changes after startup
        self.add_on_set_parameters_callback(self._on_set_parameters)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())  # runs _on_set_parameters
        self._declared = True

        self._forecaster: Any = None
        self._model_info: Dict[str, str] = {}
        self._outputs = OutputBuilder(self.param, warn=lambda text: self.get_logger().warning(
            text, throttle_duration_sec=10.0))
        self._side_outputs = SideOutputs(on_error=lambda exc: self.get_logger().error(
            f"markers/overlay failed: {type(exc).__name__}: {exc}", throttle_duration_sec=10.0))
        self._model_lock = threading.Lock()  # guards the forecaster reference (held only to swap or read it)
        self._model_takes_instruction = True  # False for models without language input (D4: instruction ignored)
        self._model_accepts_cancel = False  # forecast(..., cancel=Event) supported: deactivate stops it mid-way
        self._load_problem = ""  # why the last model load failed
        self._load_settings: Dict[str, Any] = {}  # the LOAD_PARAMETERS read at configure (activate reloads with them)
        self._release_threads: List[threading.Thread] = []  # models released after a cancelled forecast ends
        self._transition_error = ""  # why the last lifecycle transition failed ('' = it succeeded)
        self._instruction = str(self.get_parameter("instruction").value)
        self._stats = PipelineStats(window=self.param("stats_window"))
        self._pipeline: Optional[ForecastPipeline] = None
        self._camera_info: Optional[CameraInfo] = None
        self._state_label = "unconfigured"
        self._input_subscriptions: List[Any] = []
        self._forecast_pub: Any = None
        self._markers_pub: Any = None
        self._overlay_pub: Any = None
        self._publishers_lock = threading.Lock()  # side-output publishes vs destroying the publishers
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
            problem = spec.check(parameter.value) or self._check_machine_value(parameter.name, parameter.value)
            if problem:
                problems.append(problem)
        if problems:
            reason = "; ".join(problems)
            self.get_logger().warning(f"rejected parameter change: {loggable_text(reason, 400)}")
            return SetParametersResult(successful=False, reason=reason)
        for parameter in parameters:
            if parameter.name == "instruction":
                self._set_instruction(str(parameter.value))
        self._apply_frame_limits(parameters)
        return SetParametersResult(successful=True)

    def _apply_frame_limits(self, parameters: Sequence[Parameter]) -> None:
        """``max_input_age`` and ``max_clock_skew`` apply to the next frame the worker takes, not the next activate."""
        pipeline = getattr(self, "_pipeline", None)  # None while declaring the parameters and while inactive
        for parameter in parameters if pipeline is not None else ():
            if parameter.name == "max_input_age":
                pipeline.max_input_age_s = float(parameter.value)
            elif parameter.name == "max_clock_skew":
                pipeline.max_clock_skew_s = float(parameter.value)

    def _check_machine_value(self, name: str, value: Any) -> Optional[str]:
        """Checks beyond the parameter table: topic names (always), and, for changes after startup, that ``model``
        names a registry model or a model directory and that ``device`` exists here. None when acceptable."""
        if name in TOPIC_PARAMETERS:
            return topic_name_problem(name, str(value), self.get_name(), self.get_namespace())
        if not self._declared:  # startup values: a bad model fails configure with the download instructions
            return None
        if name == "model":
            return model_problem(str(value))
        if name == "device":
            return device_problem(str(value))
        if name == "guidance_scale":
            return guidance_problem(self._forecaster, float(value))
        return None

    def _set_instruction(self, instruction: str) -> None:
        if instruction != getattr(self, "_instruction", instruction):
            # Escaped and cut (a newline must not forge a log line, 100 kB must not flood it) and throttled.
            self.get_logger().info(f"instruction: {loggable_text(instruction)}", throttle_duration_sec=1.0)
        self._instruction = instruction

    # ---------------------------------------------------------------- lifecycle
    # configure and activate either complete or are rolled back to the state they started from (FAILURE): they never
    # leave a subscription, publisher or worker behind. deactivate and cleanup cannot be undone: if one fails, it
    # returns ERROR and on_error tears everything down to unconfigured. Why a transition failed is logged and shown as
    # ERROR in /diagnostics until the next successful transition.
    def _transition(self, name: str, body: Callable[[LifecycleState], None], rollback: Callable[[], None],
                    state: LifecycleState, resulting_label: str,
                    on_failure: TransitionCallbackReturn = TransitionCallbackReturn.FAILURE
                    ) -> TransitionCallbackReturn:
        try:
            body(state)
        except Exception as exc:  # noqa: BLE001 - any failure (invalid name, RCL error, model) is rolled back
            reason = str(exc) if isinstance(exc, TransitionFailed) else f"{type(exc).__name__}: {exc}"
            try:
                rollback()
            except Exception as rollback_exc:  # noqa: BLE001
                reason += f"; rolling back failed too: {type(rollback_exc).__name__}: {rollback_exc}"
            self._transition_error = f"{name} failed: {reason}"
            if on_failure == TransitionCallbackReturn.FAILURE:
                self.get_logger().error(f"{self._transition_error} (rolled back; the node stays {self._state_label})")
            return on_failure
        self._transition_error = ""
        self._state_label = resulting_label
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("configure", self._configure, self._teardown, state, "inactive")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        loaded_before = self._forecaster is not None

        def rollback() -> None:
            self._stop_inputs()
            super(ForecastNode, self).on_deactivate(state)  # the lifecycle publishers back to inactive
            if not loaded_before:  # inactive after a deactivate holds no model: release the one loaded here
                self._release_model()

        return self._transition("activate", self._activate, rollback, state, "active")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        def deactivate(state: LifecycleState) -> None:
            self._stop_inputs()  # cancels a forecast in progress (counted as stopped)
            self._release_model()  # the next activate loads the model again
            if super(ForecastNode, self).on_deactivate(state) != TransitionCallbackReturn.SUCCESS:
                raise TransitionFailed("deactivating the lifecycle publishers failed")

        return self._transition("deactivate", deactivate, lambda: None, state, "inactive",
                                on_failure=TransitionCallbackReturn.ERROR)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("cleanup", lambda state: self._teardown(), lambda: None, state, "unconfigured",
                                on_failure=TransitionCallbackReturn.ERROR)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_worker(timeout=WORKER_JOIN_S)
        self._release_model()
        self._state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised past its own rollback (rclpy then logs nothing): tear down to unconfigured."""
        self._transition_error = self._transition_error or f"transition from '{state.label}' raised an error"
        self.get_logger().error(f"{self._transition_error}; cleaning up to unconfigured")
        try:
            self._teardown()
        except Exception as exc:  # noqa: BLE001
            self.get_logger().error(f"cleanup after the error failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _configure(self, state: LifecycleState) -> None:
        self._destroy_publishers()  # never two sets of outputs, whatever happened before
        self._load_settings = {name: self.param(name) for name in LOAD_PARAMETERS}
        if not self._load_model():
            raise TransitionFailed(self._load_problem)
        self._stats = PipelineStats(window=self.param("stats_window"))
        self._forecast_pub = self.create_lifecycle_publisher(self._forecast_msg_type(), "~/forecast", OUTPUT_QOS)
        self._markers_pub = self.create_lifecycle_publisher(MarkerArray, "~/markers", OUTPUT_QOS)
        self._overlay_pub = self.create_lifecycle_publisher(Image, "~/overlay", OUTPUT_QOS)

    def _activate(self, state: LifecycleState) -> None:
        changed = [name for name in LOAD_PARAMETERS if self.param(name) != self._load_settings.get(name)]
        if changed:
            self.get_logger().info(f"{', '.join(changed)} changed since configure: applies at the next configure "
                                   "(cleanup, then configure); activating with the configured model")
        if self._forecaster is None and not self._load_model():  # released by an earlier deactivate
            raise TransitionFailed(self._load_problem)
        transport = self.param("image_transport")
        topic = str(self.param("image_topic"))
        qos = qos_from_name(self.param("qos_reliability"), self.param("qos_depth"))
        # Each subscription is recorded as soon as it exists, so a failure part-way destroys the ones made. The
        # instruction comes first: an executor serves ready subscriptions in creation order, so an instruction that
        # arrived before a frame is applied before that frame is bound to the instruction in force.
        self._input_subscriptions.append(self.create_subscription(
            String, self.param("instruction_topic"), self._on_instruction, OUTPUT_QOS))
        if transport == "compressed":
            topic = f"{topic.rstrip('/')}/compressed"
            self._input_subscriptions.append(self.create_subscription(CompressedImage, topic, self._on_image, qos))
            decode: Callable[[Any], np.ndarray] = self._decode_compressed
        else:
            self._input_subscriptions.append(self.create_subscription(Image, topic, self._on_image, qos))
            decode = self._decode_raw
        if self.param("camera_info_topic"):
            self._input_subscriptions.append(self.create_subscription(
                CameraInfo, self.param("camera_info_topic"), self._on_camera_info, qos))
        pipeline = ForecastPipeline(decode, lambda rgb, frame: self._run_forecaster(rgb, frame.instruction,
                                                                                   pipeline.stopping),
                                    self._publish_outputs, clock=self._now_s,
                                    max_input_age_s=float(self.param("max_input_age")), stats=self._stats,
                                    logger=self.get_logger(), max_clock_skew_s=float(self.param("max_clock_skew")))
        self._pipeline = pipeline
        if super().on_activate(state) != TransitionCallbackReturn.SUCCESS:
            raise TransitionFailed("activating the lifecycle publishers failed")
        pipeline.start()
        self.get_logger().info(f"forecasting {self.resolve_topic_name(topic)} ({transport}) -> "
                               f"{self.resolve_topic_name('~/forecast')}")

    def _teardown(self) -> None:
        """Back to unconfigured: no inputs, no worker, no model, no outputs."""
        self._stop_inputs()
        self._release_model()
        self._destroy_publishers()
        self._model_info = {}
        self._state_label = "unconfigured"

    def _destroy_publishers(self) -> None:
        with self._publishers_lock:  # a side-output job of an old forecast may be about to publish
            for publisher in (self._forecast_pub, self._markers_pub, self._overlay_pub):
                if publisher is not None:
                    self.destroy_lifecycle_publisher(publisher)
            self._forecast_pub = self._markers_pub = self._overlay_pub = None

    def autostart(self) -> bool:
        """Configure then activate; returns True when the node ends up active."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False  # why is logged once, by the failed transition, and shown in /diagnostics
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def stop_worker(self, timeout: float) -> bool:
        """Stop subscriptions and the worker, waiting up to ``timeout`` s; True when the worker has exited."""
        self._stop_inputs(timeout)
        return self._pipeline is None or not self._pipeline.running

    def _load_model(self) -> bool:
        """Load and warm up the model named by the load parameters read at configure; on failure keep why (and how
        to fix it) in ``_load_problem`` for the failed transition to log once, and release a model that loaded but
        failed its warmup. Waits at most ``RELEASE_WAIT_S`` for the previous model's background release, and fails
        while it is still running."""
        settings = self._load_settings or {name: self.param(name) for name in LOAD_PARAMETERS}  # read at configure
        model, device, dtype = str(settings["model"]), str(settings["device"]), str(settings["dtype"])
        # The previous model's memory first (its cancelled forecast unwinding), waiting a bounded time only.
        deadline = time.monotonic() + RELEASE_WAIT_S
        for thread in self._release_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._release_threads = [thread for thread in self._release_threads if thread.is_alive()]
        if self._release_threads:
            self._load_problem = (f"the previous model is still being released after {RELEASE_WAIT_S:.0f} s (its "
                                  "cancelled forecast has not ended yet: the forecaster does not stop at the cancel "
                                  "flag); not loading a second one. Trigger the transition again once it has ended")
            return False
        self.get_logger().info(f"loading model '{model}' (device {device}, dtype {dtype})")
        forecaster: Any = None
        try:
            import torch

            from traj_forecast_ros.cpu_cores import resolve_threads

            torch.set_num_threads(resolve_threads(int(settings["threads"])))  # the CPU plan is chosen for it
            forecaster = self._forecaster_factory(
                model, device, dtype, settings["cache_dir"] or None, use_cuda_graphs=settings["use_cuda_graphs"],
                compile=settings["compile"], graph_cache_size=int(settings["graph_cache_size"]))
            forecaster.warmup()
        except Exception as exc:  # noqa: BLE001 - a broken model must leave the node alive and unconfigured
            if isinstance(exc, FileNotFoundError):  # includes WeightsNotFoundError: one error saying how to get them
                self._load_problem = missing_model_message(model, str(exc))
            else:
                self._load_problem = f"cannot load model '{model}': {type(exc).__name__}: {exc}"
            if forecaster is not None:  # loaded, but warmup failed: free its memory
                self._release_forecaster(forecaster)
            return False
        problem = guidance_problem(forecaster, float(self.param("guidance_scale")))
        if problem:
            self._load_problem = problem
            self._release_forecaster(forecaster)
            return False
        takes_instruction = model_takes_instruction(forecaster)
        accepts_cancel = "cancel" in inspect.signature(forecaster.forecast).parameters
        with self._model_lock:
            self._forecaster = forecaster
            self._model_takes_instruction, self._model_accepts_cancel = takes_instruction, accepts_cancel
        config = getattr(forecaster, "config", None)
        self._outputs.model_frame_interval = float(getattr(config, "frame_interval_s", None) or 0.0)
        plan = getattr(forecaster, "plan", None)
        self._model_info = {"model_id": str(getattr(forecaster, "model_id", model)),
                            "device": str(getattr(forecaster, "device", device)),
                            "dtype": str(getattr(forecaster, "dtype", dtype)).replace("torch.", ""),
                            "threads": str(torch.get_num_threads()),
                            "plan": plan.summary() if hasattr(plan, "summary") else ""}
        self.get_logger().info(f"model ready: {self._model_info}")
        return True

    def _stop_inputs(self, timeout: float = WORKER_JOIN_S) -> None:
        """Destroy the subscriptions (a failing one stays listed for the next attempt) and stop the worker, waiting
        up to ``timeout`` s for it."""
        try:
            while self._input_subscriptions:
                self.destroy_subscription(self._input_subscriptions[-1])
                self._input_subscriptions.pop()
        finally:
            if self._pipeline is not None:
                # Sets the cancel flag: a forecast in progress stops at its next denoiser step (counted as stopped)
                # and nothing is published afterwards. Waits at most `timeout`, so the executor never stalls.
                self._pipeline.stop(timeout=timeout)
            self._side_outputs.stop(timeout=timeout)  # markers/overlay still waiting are dropped

    def _release_model(self) -> None:
        """Free the model and its accelerator memory (``Forecaster.release``): now when the worker is idle, else in
        a background thread once the cancelled forecast has unwound (the transition does not wait for it)."""
        with self._model_lock:
            forecaster, self._forecaster = self._forecaster, None
        if forecaster is None:
            return
        if self._pipeline is not None and self._pipeline.running:
            thread = threading.Thread(target=self._release_forecaster, args=(forecaster,), name="forecast-release",
                                      daemon=True)
            self._release_threads.append(thread)
            thread.start()
        else:
            self._release_forecaster(forecaster)

    def _release_forecaster(self, forecaster: Any) -> None:
        if hasattr(forecaster, "release"):
            try:
                forecaster.release()  # Forecaster.release waits for its own forecast in progress
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
            pipeline.submit(Frame(message=msg, stamp_s=stamp, instruction=self._instruction or None))

    def _on_instruction(self, msg: String) -> None:
        if msg.data != self._instruction:
            self.set_parameters([Parameter("instruction", Parameter.Type.STRING, msg.data)])

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---------------------------------------------------------------- worker thread
    def _decode_raw(self, msg: Image) -> np.ndarray:
        return image_msg_to_rgb(msg, max_pixels=int(self.param("max_pixels")), min_side=MIN_IMAGE_SIDE)

    def _decode_compressed(self, msg: CompressedImage) -> np.ndarray:
        return compressed_msg_to_rgb(msg, max_pixels=int(self.param("max_pixels")), min_side=MIN_IMAGE_SIDE)

    def _run_forecaster(self, rgb: np.ndarray, instruction: Optional[str],
                        cancel: Optional[threading.Event] = None) -> Any:
        """Forecast ``rgb`` conditioned on ``instruction`` (the one in force when its frame arrived)."""
        seed = int(self.param("seed"))
        with self._model_lock:
            forecaster = self._forecaster
            takes_instruction, accepts_cancel = self._model_takes_instruction, self._model_accepts_cancel
        if forecaster is None:
            raise RuntimeError("no model loaded (node not configured)")
        if hasattr(forecaster, "max_pixels"):  # one limit, the node's: the one the frame was decoded against
            forecaster.max_pixels = int(self.param("max_pixels"))
        if instruction is not None and not takes_instruction:
            self.get_logger().warning(
                f"model '{self._model_info.get('model_id', '')}' has no language input: ignoring the instruction "
                f"{loggable_text(instruction, 60)} (instruction_ignored in /diagnostics)", throttle_duration_sec=60.0)
            instruction = None
        options: Dict[str, Any] = {"cancel": cancel} if accepts_cancel and cancel is not None else {}
        # Failures are classified and counted (consecutive_failures included) by ForecastPipeline.process.
        steps, guidance = int(self.param("steps")), float(self.param("guidance_scale"))
        if guidance >= 0:  # -1: the model's own (a model without guidance fails configure for other values)
            options["guidance_scale"] = guidance
        return forecaster.forecast(rgb, instruction=instruction, num_samples=int(self.param("num_samples")),
                                   steps=steps or None, seed=None if seed < 0 else seed, **options)

    @property
    def _instruction_ignored(self) -> bool:
        """An instruction is set but the loaded model has no language input (D4: it is ignored, not fatal)."""
        return bool(self._instruction) and self._forecaster is not None and not self._model_takes_instruction

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
        camera_info = self._camera_info
        self._forecast_pub.publish(self._outputs.forecast_msg(forecast, header, camera_info))
        markers_pub, overlay_pub = self._markers_pub, self._overlay_pub
        wants_markers = markers_pub.get_subscription_count() > 0
        wants_overlay = overlay_pub.get_subscription_count() > 0
        if not (wants_markers or wants_overlay):
            return
        period = self._stats.forecast_rate.period()

        def side_outputs() -> None:  # off the worker: the next frame's forecast starts meanwhile
            if markers_pub is not self._markers_pub:  # torn down (or reconfigured) since: nothing to build
                return
            markers = self._outputs.markers_serialized(forecast, header, camera_info, period) if wants_markers else None
            overlay = self._outputs.overlay(forecast, rgb, header) if wants_overlay else None
            with self._publishers_lock:  # publish only on publishers that still exist
                if markers_pub is not self._markers_pub:
                    return
                if markers is not None:
                    markers_pub.publish(markers)
                if overlay is not None:
                    overlay_pub.publish(overlay)

        self._side_outputs.submit(side_outputs)

    # ---------------------------------------------------------------- diagnostics (executor thread)
    def publish_diagnostics(self) -> None:
        """Publish the node's status on /diagnostics (called by a 1 Hz timer)."""
        status = diagnostic_status(f"{self.get_fully_qualified_name()}: trajectory forecast", self._state_label,
                                   self._stats.snapshot(), self._model_info, self._consecutive_failures,
                                   fp32_fallbacks=int(getattr(self._forecaster, "fp32_fallbacks", 0) or 0),
                                   transition_error=self._transition_error,
                                   instruction_ignored=self._instruction_ignored)
        array_msg = DiagnosticArray(status=[status])
        array_msg.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics_pub.publish(array_msg)


def _stop_like_sigint(signum: int, frame: Any) -> NoReturn:
    """SIGTERM handler: stop at once, as SIGINT does, even in the middle of a model load or a transition."""
    raise KeyboardInterrupt(f"signal {signum}")


def _ignore_stop_signals() -> None:
    """Once the node is stopping, a further SIGINT/SIGTERM must not interrupt the shutdown (a KeyboardInterrupt
    inside it would end the interpreter with the worker still in native code: an abort, exit -6)."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)


def main(args: Optional[List[str]] = None) -> NoReturn:
    """Entry point of ``forecast_node`` (console script and ``python -m traj_forecast_ros.ros.forecast_node``); ends
    the process with exit code 0, or 1 when the node could not start."""
    # SIGINT and SIGTERM both end the spin (rclpy's handlers shut ROS down, then call the Python handler: SIGINT's
    # raises KeyboardInterrupt, and so does SIGTERM's, installed here first), so `kill <pid>` and systemd stop the
    # node cleanly and promptly, during a model load too.
    signal.signal(signal.SIGTERM, _stop_like_sigint)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.ALL)
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
        if node is not None and not rclpy.ok():
            # A signal shut ROS down while the executor was building its wait set, and rcl raised "the given
            # context is not valid": that is the stop that was asked for, not a failure.
            pass
        else:
            print(f"forecast_node: {type(exc).__name__}: {exc}", file=sys.stderr)
            exit_code = 1
    finally:
        _ignore_stop_signals()
        try:
            if node is not None:
                node.stop_worker(timeout=WORKER_JOIN_S)  # cancels a forecast in progress; never waits for a long one
                node.destroy_node()
            rclpy.try_shutdown()
        except KeyboardInterrupt:  # a second signal that landed before it was ignored: the stop was asked for anyway
            pass
        _ignore_stop_signals()  # rclpy's shutdown puts the previous handlers back
    # ROS is shut down and nothing is left to publish. Leave without finalising the interpreter: after torch and DDS
    # that takes about 2 s (so a SIGTERM/SIGINT stop would miss its deadline), and a worker still inside native
    # torch code (a forecaster that ignores the cancel flag) can abort it ("terminate called without an active
    # exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    main()
