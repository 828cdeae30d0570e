"""How the forecast node gets, holds and gives back its one model (shared by all its cameras).

No rclpy here: the node (``forecast_node``) calls :class:`ModelHolder` from its configure, activate, deactivate and
cleanup transitions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from traj_forecast_ros.cpu_cores import resolve_threads
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.ros.validation import guidance_problem, missing_model_message

ForecasterFactory = Callable[..., Any]  # (model, device, dtype, cache_dir, **accelerator_options) -> forecaster

# Read at configure only: a deactivate releases the model and the next activate loads it again with these same values
# (the same model, never one the parameters name since: that needs cleanup, then configure).
LOAD_PARAMETERS = ("model", "device", "dtype", "threads", "cache_dir", "use_cuda_graphs", "compile", "graph_cache_size")
# A load waits this long for the previous model's background release (its cancelled forecast unwinding, usually one
# denoiser step). A model still unwinding after it (a forecaster that ignores the cancel flag) fails configure/activate
# with that reason, rolled back, rather than block the executor or hold two models in accelerator memory at once.
RELEASE_WAIT_S = 2.0


def model_takes_instruction(forecaster: Any) -> bool:
    """False when the loaded model has no language input (a Forecaster without a text encoder)."""
    if hasattr(forecaster, "text_encoder"):
        return forecaster.text_encoder is not None
    config = getattr(forecaster, "config", None)
    return getattr(config, "text_encoder", True) is not None


def load_forecaster(model: str, device: str, dtype: str, cache_dir: Optional[str], use_cuda_graphs: bool = False,
                    compile: bool = False, graph_cache_size: int = 4, num_samples: int = DEFAULT_NUM_SAMPLES) -> Any:
    """Default factory: ``Forecaster.from_pretrained`` (a registry name or a model directory); the CPU plan is chosen
    (probed) for ``num_samples``, the K the node serves when it configures."""
    return Forecaster.from_pretrained(model, device=device, dtype=dtype, cache_dir=cache_dir,
                                      use_cuda_graph=use_cuda_graphs, use_compile=compile,
                                      graph_cache_size=graph_cache_size, num_samples=num_samples)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, warmed-up forecaster and what the node reads from it once."""

    forecaster: Any
    takes_instruction: bool  # False: the model has no language input (an instruction is ignored, D4)
    frame_interval_s: float  # the model config's seconds between forecast frames (0 = unknown)
    info: Dict[str, str] = field(default_factory=dict)  # model_id, device, dtype, threads, plan (diagnostics)


class ModelHolder:
    """The node's one model: :meth:`load` it, read it (:attr:`model`), :meth:`release` it (now, or in background
    once a cancelled forecast has unwound). ``loads`` counts the models loaded (one per configure/activate, however
    many cameras)."""

    def __init__(self, factory: ForecasterFactory, logger: Any) -> None:
        self.factory = factory
        self.logger = logger
        self.problem = ""  # why the last load failed, with how to fix it
        self.loads = 0
        self._model: Optional[LoadedModel] = None
        self._lock = threading.Lock()  # guards the model reference (held only to swap or read it)
        self._release_threads: List[threading.Thread] = []  # models released after a cancelled forecast ends

    @property
    def model(self) -> Optional[LoadedModel]:
        """The loaded model, or None."""
        with self._lock:
            return self._model

    @property
    def forecaster(self) -> Any:
        """The loaded forecaster, or None."""
        model = self.model
        return None if model is None else model.forecaster

    def load(self, settings: Mapping[str, Any], guidance_scale: float, num_samples: int) -> bool:
        """Load and warm up the model named by the load parameters ``settings`` (read at configure), its CPU plan
        chosen for ``num_samples`` (the K it will serve first; another K later still works); on failure keep
        why in :attr:`problem` and release a model that loaded but failed its warmup. Waits at most
        ``RELEASE_WAIT_S`` for the previous model's background release, and fails while it is still running."""
        model, device, dtype = str(settings["model"]), str(settings["device"]), str(settings["dtype"])
        deadline = time.monotonic() + RELEASE_WAIT_S
        for thread in self._release_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._release_threads = [thread for thread in self._release_threads if thread.is_alive()]
        if self._release_threads:
            self.problem = (f"the previous model is still being released after {RELEASE_WAIT_S:.0f} s (its cancelled "
                            "forecast has not ended yet: the forecaster does not stop at the cancel flag); not "
                            "loading a second one. Trigger the transition again once it has ended")
            return False
        self.logger.info(f"loading model '{model}' (device {device}, dtype {dtype})")
        forecaster: Any = None
        try:
            torch.set_num_threads(resolve_threads(int(settings["threads"])))  # the CPU plan is chosen for it
            forecaster = self.factory(
                model, device, dtype, settings["cache_dir"] or None, use_cuda_graphs=settings["use_cuda_graphs"],
                compile=settings["compile"], graph_cache_size=int(settings["graph_cache_size"]),
                num_samples=int(num_samples))
            forecaster.warmup()
        except Exception as exc:  # noqa: BLE001 - a broken model must leave the node alive and unconfigured
            if isinstance(exc, FileNotFoundError):  # includes WeightsNotFoundError: one error saying how to get them
                self.problem = missing_model_message(model, str(exc))
            else:
                self.problem = f"cannot load model '{model}': {type(exc).__name__}: {exc}"
            if forecaster is not None:  # loaded, but warmup failed: free its memory
                self._release_forecaster(forecaster)
            return False
        problem = guidance_problem(forecaster, guidance_scale)
        if problem:
            self.problem = problem
            self._release_forecaster(forecaster)
            return False
        config = getattr(forecaster, "config", None)
        plan = getattr(forecaster, "plan", None)
        info = {"model_id": str(getattr(forecaster, "model_id", model)),
                "device": str(getattr(forecaster, "device", device)),
                "dtype": str(getattr(forecaster, "dtype", dtype)).replace("torch.", ""),
                "threads": str(torch.get_num_threads()),
                "plan": plan.summary() if hasattr(plan, "summary") else ""}
        loaded = LoadedModel(forecaster, model_takes_instruction(forecaster),
                             float(getattr(config, "frame_interval_s", None) or 0.0), info)
        with self._lock:
            self._model = loaded
        self.loads += 1
        self.logger.info(f"model ready: {info}")
        return True

    def release(self, in_background: bool) -> None:
        """Free the model and its accelerator memory (``Forecaster.release``): now, or ``in_background`` (the
        worker is still unwinding a cancelled forecast; the transition does not wait for it)."""
        with self._lock:
            loaded, self._model = self._model, None
        if loaded is None:
            return
        if in_background:
            thread = threading.Thread(target=self._release_forecaster, args=(loaded.forecaster,),
                                      name="forecast-release", daemon=True)
            self._release_threads.append(thread)
            thread.start()
        else:
            self._release_forecaster(loaded.forecaster)

    def _release_forecaster(self, forecaster: Any) -> None:
        if hasattr(forecaster, "release"):
            try:
                forecaster.release()  # Forecaster.release waits for its own forecast in progress
            except Exception as exc:  # noqa: BLE001
                self.logger.warning(f"releasing the model failed: {type(exc).__name__}: {exc}")
