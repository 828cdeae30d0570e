"""How the forecast node gets its model: the default forecaster factory and the parameters a load reads.

No rclpy here: the node (``forecast_node``) calls these from its configure and activate transitions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

ForecasterFactory = Callable[..., Any]  # (model, device, dtype, cache_dir, **accelerator_options) -> forecaster

# Read at configure only: a deactivate releases the model and the next activate loads it again with these same values
# (the same model, never one the parameters name since: that needs cleanup, then configure).
LOAD_PARAMETERS = ("model", "device", "dtype", "threads", "cache_dir", "use_cuda_graphs", "compile", "graph_cache_size")

def model_takes_instruction(forecaster: Any) -> bool:
    """False when the loaded model has no language input (a Forecaster without a text encoder)."""
    if hasattr(forecaster, "text_encoder"):
        return forecaster.text_encoder is not None
    config = getattr(forecaster, "config", None)
    return getattr(config, "text_encoder", True) is not None


def guidance_problem(forecaster: Any, guidance_scale: float) -> Optional[str]:
    """Why ``guidance_scale`` (the node parameter: -1 = the model's own) cannot be used with the loaded
    ``forecaster``, or None (also when no model is loaded yet: it is checked again at configure)."""
    config = getattr(forecaster, "config", None)
    if guidance_scale in (-1.0, 1.0) or config is None or getattr(config, "supports_guidance", True):
        return None
    return (f"guidance_scale {guidance_scale:g} needs a model trained with instruction dropout; model "
            f"'{getattr(config, 'name', '?')}' has no unconditional embedding (set guidance_scale to 1 or -1)")


def load_forecaster(model: str, device: str, dtype: str, cache_dir: Optional[str], use_cuda_graphs: bool = False,
                    compile: bool = False, graph_cache_size: int = 4) -> Any:
    """Default factory: ``Forecaster.from_pretrained`` (a registry name or a model directory)."""
    from traj_forecast_ros.forecaster import Forecaster

    return Forecaster.from_pretrained(model, device=device, dtype=dtype, cache_dir=cache_dir,
                                      use_cuda_graph=use_cuda_graphs, use_compile=compile,
                                      graph_cache_size=graph_cache_size)
