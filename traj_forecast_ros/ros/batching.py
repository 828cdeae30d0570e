"""One forecaster call for the frames of several cameras: the options a call shares, and the call itself.

Frames whose snapshots agree on the call options (K, steps, guidance, max_pixels) go into one
``Forecaster.forecast_batch`` call (cameras x K samples in one denoiser batch); each frame keeps its own image,
instruction and seed. No rclpy here.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from traj_forecast_ros.forecast import ForecastRequest
from traj_forecast_ros.ros.settings import Settings


class CallOptions(NamedTuple):
    """What one ``forecast_batch`` call shares: read from a frame's parameter snapshot."""

    num_samples: int
    steps: Optional[int]  # None: the model's default_steps
    guidance_scale: Optional[float]  # None: the model's own
    max_pixels: int  # the node's limit, the one the frame was decoded against

    @classmethod
    def from_settings(cls, settings: Settings) -> "CallOptions":
        guidance = float(settings["guidance_scale"])
        return cls(int(settings["num_samples"]), int(settings["steps"]) or None,
                   None if guidance < 0 else guidance, int(settings["max_pixels"]))


def request_for(rgb: Any, instruction: Optional[str], settings: Settings) -> ForecastRequest:
    """The request of one decoded frame: its image, the instruction in force when it arrived, the seed parameter."""
    seed = int(settings["seed"])
    return ForecastRequest(image=rgb, instruction=instruction, seed=None if seed < 0 else seed)


def _accepted(function: Any, options: Dict[str, Any]) -> Dict[str, Any]:
    """The ``options`` that ``function`` takes by name (all of them when it takes ``**kwargs``)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    return {name: value for name, value in options.items() if name in parameters}


def forecast_requests(forecaster: Any, requests: Sequence[ForecastRequest], options: CallOptions,
                      cancel: Optional[threading.Event] = None) -> List[Any]:
    """``forecaster.forecast_batch(requests, ...)``: one call for all requests, returning one result per request.

    A forecaster with only ``forecast`` (a test fake, a third-party model) is called once per request with the
    options its signature takes. Raises what the forecaster raises (``ForecastCancelled`` once ``cancel`` is set).
    """
    call: Dict[str, Any] = {"num_samples": options.num_samples, "steps": options.steps, "cancel": cancel,
                            "max_pixels": options.max_pixels}
    if options.guidance_scale is not None:
        call["guidance_scale"] = options.guidance_scale
    batch = getattr(forecaster, "forecast_batch", None)
    if batch is not None:
        results = list(batch(list(requests), **_accepted(batch, call)))
    else:
        single = _accepted(forecaster.forecast, call)
        results = [forecaster.forecast(request.image, instruction=request.instruction, seed=request.seed, **single)
                   for request in requests]
    if len(results) != len(requests):
        raise RuntimeError(f"the forecaster returned {len(results)} forecasts for {len(requests)} images")
    return results
