"""``forecast_node``: a lifecycle node that forecasts dense point trajectories from one or several camera streams.

    python -m traj_forecast_ros.ros.forecast_node --ros-args --params-file config/forecast.yaml

Lifecycle: ``configure`` loads the model (one, whatever the number of cameras) and warms it up; ``activate``
subscribes to the cameras and starts the worker; ``deactivate`` unsubscribes, stops inference and releases the model
with its accelerator memory (the next ``activate`` loads the same model again: ``model``, ``device``, ``dtype``,
``threads`` and the other load parameters are read at configure only); ``cleanup`` drops the model and the
publishers. With ``autostart`` (default) the node configures and activates itself at startup. Parameters:
:mod:`traj_forecast_ros.ros.params`; cameras: :mod:`traj_forecast_ros.ros.cameras` (``cameras`` may change only
while unconfigured: a change while inactive or active is refused; it applies at the next configure).

Topics (relative names, so namespaces and remappings apply; the tables are :mod:`traj_forecast_ros.ros.io_tables`):
    in:  single camera: ``<image_topic>`` (sensor_msgs/Image) or ``<image_topic>/compressed``
         (sensor_msgs/CompressedImage), optionally ``<camera_info_topic>``; named cameras: each its own
         ``<camera>.image_topic`` (+ transport suffix), ``<camera>.camera_info_topic``, ``<camera>.instruction_topic``;
         ``instruction`` (std_msgs/String) for all
    out: single camera: ``~/forecast`` (traj_forecast_msgs/TrajectoryForecast), ``~/markers``
         (visualization_msgs/MarkerArray), ``~/overlay`` (sensor_msgs/Image); named cameras: ``~/<camera>/forecast``,
         ``~/<camera>/markers``, ``~/<camera>/overlay``; ``/diagnostics`` (diagnostic_msgs/DiagnosticArray, 1 Hz)
Every output carries its source image's header. Markers and overlay are built only while someone subscribes. Frames
of several cameras that wait at the same time are forecast in one batched call.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import String

from traj_forecast_ros.ros.cameras import (CAMERA_FIELDS, CAMERAS_PARAMETER, CameraConfig, camera_configs,
                                           camera_field_default, camera_parameter, duplicate_topics_problem,
                                           split_camera_parameter)
from traj_forecast_ros.ros.diagnostics import diagnostic_status
from traj_forecast_ros.ros.inputs import CameraInputs
from traj_forecast_ros.ros.io_tables import output_topic
from traj_forecast_ros.ros.model_loading import LOAD_PARAMETERS, ForecasterFactory, ModelHolder, load_forecaster
from traj_forecast_ros.ros.outputs import OutputBuilder, SideOutputs
from traj_forecast_ros.ros.params import PARAMETER_SPECS, PARAMETERS, ParamSpec
from traj_forecast_ros.ros.pipeline import ForecastPipeline, Frame, StatsBook
from traj_forecast_ros.ros.publishing import CameraPublishers
from traj_forecast_ros.ros.qos import qos_from_name
from traj_forecast_ros.ros.settings import Settings
from traj_forecast_ros.ros.validation import loggable_text, parameter_problem

NODE_NAME = "forecast_node"
WORKER_JOIN_S = 0.5  # a transition waits this long for a cancelled forecast, then releases the model in background
CAMERAS_DESCRIPTOR = ParameterDescriptor(
    name=CAMERAS_PARAMETER, description="Camera names (unset = one camera: image_topic); each has <camera>.image_topic, "
    ".transport, .camera_info_topic, .instruction_topic, .camera_frame. Changes only while unconfigured (refused "
    "otherwise); applies at configure.")


class TransitionFailed(Exception):
    """A lifecycle transition cannot complete; the message says why (logged and shown in /diagnostics)."""


class ForecastNode(LifecycleNode):
    """Lifecycle node: camera frames in, trajectory forecasts, markers, overlays and diagnostics out, per camera.

    Args:
        forecaster_factory: ``(model, device, dtype, cache_dir, use_cuda_graphs=, compile=, graph_cache_size=)
            -> forecaster`` used at configure; the default loads :class:`traj_forecast_ros.forecaster.Forecaster`.
            Tests inject fakes here.
        **kwargs: passed to ``LifecycleNode`` (``namespace``, ``context``, ``parameter_overrides``, ...).
    """

    def __init__(self, node_name: str = NODE_NAME, *, forecaster_factory: Optional[ForecasterFactory] = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._declared = False  # model/device are checked against this machine only for changes after startup
        self._state_label = "unconfigured"
        self._settings = Settings()  # the parameter snapshot, replaced (never changed) on every accepted set
        self._camera_names: List[str] = []  # the cameras parameter; [] = the single image_topic camera
        self._declared_cameras: set = set()  # cameras whose <camera>.<field> parameters are declared
        self.add_on_set_parameters_callback(self._on_set_parameters)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())  # runs _on_set_parameters
        self.declare_parameter(CAMERAS_PARAMETER, Parameter.Type.STRING_ARRAY, CAMERAS_DESCRIPTOR)
        self._declare_cameras()
        self._declared = True

        self.models = ModelHolder(forecaster_factory or load_forecaster, self.get_logger())
        self._load_settings: Dict[str, Any] = {}  # the LOAD_PARAMETERS read at configure (activate reloads with them)
        self._transition_error = ""  # why the last lifecycle transition failed ('' = it succeeded)
        self.stats = StatsBook(window=int(self._settings["stats_window"]))
        self.pipeline: Optional[ForecastPipeline] = None
        self.inputs = CameraInputs(self)
        side_outputs = SideOutputs(on_error=lambda exc: self.get_logger().error(
            f"markers/overlay failed: {type(exc).__name__}: {exc}", throttle_duration_sec=10.0))
        builder = OutputBuilder(warn=lambda text: self.get_logger().warning(text, throttle_duration_sec=10.0))
        self.outputs = CameraPublishers(self, builder, side_outputs, period=lambda camera: self.stats.period(camera))
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Wall-clock (steady) period: with use_sim_time a slowed or paused /clock must not slow the diagnostics.
        self._diagnostics_timer = self.create_timer(1.0, self.publish_diagnostics,
                                                    clock=Clock(clock_type=ClockType.STEADY_TIME))

    # ---------------------------------------------------------------- parameters
    def param(self, name: str) -> Any:
        """Current value of a declared parameter (from the snapshot)."""
        return self._settings[name]

    @property
    def settings(self) -> Settings:
        """The current parameter snapshot (immutable: a frame keeps the one it arrived with)."""
        return self._settings

    @property
    def cameras(self) -> List[CameraConfig]:
        """The cameras' inputs under the current parameters."""
        return camera_configs(self._settings, self._camera_names)

    def _declare_cameras(self) -> None:
        """Declare ``<camera>.<field>`` for the cameras named since (their override values apply)."""
        try:
            self._camera_names = list(self.get_parameter(CAMERAS_PARAMETER).value or [])
        except ParameterUninitializedException:
            self._camera_names = []
        for camera in self._camera_names:
            if camera in self._declared_cameras:
                continue
            for spec in CAMERA_FIELDS:
                name = camera_parameter(camera, spec.name)
                self.declare_parameter(name, camera_field_default(camera, spec.name),
                                       replace(spec, name=name).descriptor())
            self._declared_cameras.add(camera)

    def _spec_for(self, name: str) -> Optional[ParamSpec]:
        split = split_camera_parameter(name, self._camera_names)
        return PARAMETER_SPECS.get(name) or (split[1] if split else None)

    def _on_set_parameters(self, parameters: Sequence[Parameter]) -> SetParametersResult:
        problems = []
        for parameter in parameters:
            if parameter.type_ == Parameter.Type.NOT_SET:
                continue
            spec = self._spec_for(parameter.name)
            problem = spec.check(parameter.value) if spec is not None else None
            problem = problem or parameter_problem(
                parameter.name, parameter.value, cameras=self._camera_names, node_name=self.get_name(),
                namespace=self.get_namespace(), state=self._state_label if self._declared else "",
                forecaster=self.models.forecaster if self._declared else None)
            if problem:
                problems.append(problem)
        if problems:
            reason = "; ".join(problems)
            self.get_logger().warning(f"rejected parameter change: {loggable_text(reason, 400)}")
            return SetParametersResult(successful=False, reason=reason)
        changes = {p.name: p.value for p in parameters if p.type_ != Parameter.Type.NOT_SET}
        if "instruction" in changes and changes["instruction"] != self._settings.get("instruction", ""):
            # Escaped and cut (a newline must not forge a log line, 100 kB must not flood it) and throttled.
            self.get_logger().info(f"instruction: {loggable_text(str(changes['instruction']))}",
                                   throttle_duration_sec=1.0)
        self._settings = self._settings.updated(changes)
        return SetParametersResult(successful=True)

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
        loaded_before = self.models.model is not None

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
        self.outputs.destroy()  # never two sets of outputs, whatever happened before
        self._declare_cameras()  # cameras named while unconfigured get their parameters now
        self._load_settings = {name: self.param(name) for name in LOAD_PARAMETERS}
        self._load_model()
        self.stats = StatsBook([camera.name for camera in self.cameras], window=int(self.param("stats_window")))
        self.outputs.create([camera.name for camera in self.cameras])

    def _activate(self, state: LifecycleState) -> None:
        changed = [name for name in LOAD_PARAMETERS if self.param(name) != self._load_settings.get(name)]
        if changed:
            self.get_logger().info(f"{', '.join(changed)} changed since configure: applies at the next configure "
                                   "(cleanup, then configure); activating with the configured model")
        cameras = self.cameras
        clash = duplicate_topics_problem(cameras, self.resolve_topic_name)
        if clash:
            raise TransitionFailed(clash)
        if self.models.model is None:  # released by an earlier deactivate
            self._load_model()
        model = self.models.model
        self.outputs.model_frame_interval = model.frame_interval_s
        self.pipeline = ForecastPipeline(
            model.forecaster, self.outputs.publish, clock=self._now_s, cameras=[camera.name for camera in cameras],
            takes_instruction=model.takes_instruction, max_batch=int(self.param("max_batch_cameras")),
            stats=self.stats, logger=self.get_logger())
        self.inputs.subscribe(cameras, qos_from_name(self.param("qos_reliability"), self.param("qos_depth")),
                              str(self.param("instruction_topic")), self._on_image, self._on_instruction)
        if super().on_activate(state) != TransitionCallbackReturn.SUCCESS:
            raise TransitionFailed("activating the lifecycle publishers failed")
        self.pipeline.start()
        for camera in cameras:
            self.get_logger().info(f"forecasting {self.resolve_topic_name(camera.subscribed_topic)} "
                                   f"({camera.transport}) -> {self.resolve_topic_name(output_topic(camera.name, 'forecast'))}")

    def _load_model(self) -> None:
        settings = self._load_settings or {name: self.param(name) for name in LOAD_PARAMETERS}
        if not self.models.load(settings, float(self.param("guidance_scale")), int(self.param("num_samples"))):
            raise TransitionFailed(self.models.problem)

    def _teardown(self) -> None:
        """Back to unconfigured: no inputs, no worker, no model, no outputs."""
        self._stop_inputs()
        self._release_model()
        self.outputs.destroy()
        self._state_label = "unconfigured"

    def _release_model(self) -> None:
        """Release the model now when the worker is idle, else in background once the cancelled forecast ends."""
        self.models.release(in_background=self.pipeline is not None and self.pipeline.running)

    def _stop_inputs(self, timeout: float = WORKER_JOIN_S) -> None:
        """Destroy the subscriptions and stop the worker, waiting up to ``timeout`` s for it."""
        try:
            self.inputs.unsubscribe()
        finally:
            if self.pipeline is not None:
                # Sets the cancel flag: a forecast in progress stops at its next denoiser step (counted as stopped)
                # and nothing is published afterwards. Waits at most `timeout`, so the executor never stalls.
                self.pipeline.stop(timeout=timeout)
            self.outputs.side_outputs.stop(timeout=timeout)  # markers/overlay still waiting are dropped

    def autostart(self) -> bool:
        """Configure then activate; returns True when the node ends up active."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False  # why is logged once, by the failed transition, and shown in /diagnostics
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def stop_worker(self, timeout: float) -> bool:
        """Stop subscriptions and the worker, waiting up to ``timeout`` s; True when the worker has exited."""
        self._stop_inputs(timeout)
        return self.pipeline is None or not self.pipeline.running

    # ---------------------------------------------------------------- callbacks (executor thread, O(1))
    def _on_image(self, camera: CameraConfig, msg: Any) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        own = self.inputs.instruction(camera.name)
        instruction = own if own is not None else str(self._settings["instruction"])
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        pipeline.submit(Frame(message=msg, stamp_s=stamp, settings=self._settings, camera=camera.name,
                              transport=camera.transport, instruction=instruction or None,
                              camera_info=self.inputs.camera_info.get(camera.name)))

    def _on_instruction(self, msg: String) -> None:
        if msg.data != self._settings["instruction"]:
            self.set_parameters([Parameter("instruction", Parameter.Type.STRING, msg.data)])

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ---------------------------------------------------------------- diagnostics (executor thread)
    @property
    def instruction_ignored(self) -> bool:
        """An instruction is set but the loaded model has no language input (D4: it is ignored, not fatal)."""
        model = self.models.model
        instructions = [str(self._settings["instruction"])] + list(self.inputs.instructions.values())
        return any(instructions) and model is not None and not model.takes_instruction

    def publish_diagnostics(self) -> None:
        """Publish the node's status on /diagnostics (called by a 1 Hz timer); with named cameras, each camera's
        counters too."""
        stats = self.stats
        per_camera = {camera: camera_stats.snapshot() for camera, camera_stats in stats.cameras.items()
                      if camera} if self._camera_names else None
        model = self.models.model
        status = diagnostic_status(f"{self.get_fully_qualified_name()}: trajectory forecast", self._state_label,
                                   stats.total.snapshot(), model.info if model else {}, stats.consecutive_failures,
                                   fp32_fallbacks=int(getattr(self.models.forecaster, "fp32_fallbacks", 0) or 0),
                                   transition_error=self._transition_error,
                                   instruction_ignored=self.instruction_ignored, cameras=per_camera,
                                   models_loaded=self.models.loads,
                                   batch_sizes=self.pipeline.batch_sizes if self.pipeline else ())
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
