"""Which forecasting model to use when none is named: the best one that is available without network access."""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch

from traj_forecast_ros import registry
from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.checkpoint import save_model_dir
from traj_forecast_ros.model.presets import tiny_config

log = logging.getLogger(__name__)

DEMO_MODEL = "demo-blocks"
SIM_MODEL = "sim-manipulation"  # trained on simulated LIBERO-like manipulation; preferred over DEMO_MODEL when present
LIBERO_MODEL = "libero-atm"


def _available(name: str, cache_dir: Optional[str] = None) -> bool:
    """True when ``name`` resolves offline; a present but corrupt or changed model (:class:`CheckpointError`) is
    unavailable too, with the reason logged, so the choice falls back to the next model."""
    try:
        registry.resolve(name, cache_dir)
    except (WeightsNotFoundError, FileNotFoundError):
        return False
    except CheckpointError as exc:
        log.warning("model '%s' is present but unusable, trying the next one: %s", name, exc)
        return False
    return True


def _cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def best_offline_model(cache_dir: Optional[str] = None) -> Tuple[str, str]:
    """``(model name, why)``: the LIBERO model when downloaded and a GPU is present (on a CPU it takes tens of
    seconds per sample), else the shipped ``sim-manipulation`` (trained on simulated manipulation clips) when its
    directory is present, else the shipped ``demo-blocks``, else a downloaded LIBERO model on the CPU.

    Raises:
        WeightsNotFoundError: no model is available offline; the message says how to get one.
    """
    has_libero = _available(LIBERO_MODEL, cache_dir)
    if has_libero and _cuda_available():
        return LIBERO_MODEL, "LIBERO weights are downloaded and a CUDA GPU is available"
    libero_hint = ("LIBERO weights are downloaded, but without a GPU they take tens of seconds per sample"
                   if has_libero else f"for LIBERO-trained forecasts: `traj-forecast download {LIBERO_MODEL}` (GPU "
                   "recommended)")
    if _available(SIM_MODEL, cache_dir):
        return SIM_MODEL, ("the model shipped with the package, trained on simulated LIBERO-like manipulation "
                           f"clips; {libero_hint}")
    if _available(DEMO_MODEL, cache_dir):
        return DEMO_MODEL, f"the model shipped with the package, trained on synthetic block scenes; {libero_hint}"
    if has_libero:
        return LIBERO_MODEL, "the only model available offline (slow on a CPU)"
    tried: List[str] = [SIM_MODEL, DEMO_MODEL, LIBERO_MODEL]
    raise WeightsNotFoundError(
        f"no forecasting model is available offline (tried {', '.join(tried)}): the shipped '{SIM_MODEL}' and "
        f"'{DEMO_MODEL}' model directories are missing and '{LIBERO_MODEL}' is not downloaded. Run "
        f"`traj-forecast download {LIBERO_MODEL}` once with network access, or pass --model DIR with a model directory."
    )


def untrained_fallback(directory: str) -> Tuple[str, str]:
    """``(model, why)`` from :func:`best_offline_model`, or, when no trained model is available, an untrained tiny
    model written into ``directory`` (the pipeline runs end to end, but its forecasts are meaningless)."""
    try:
        return best_offline_model()
    except WeightsNotFoundError as exc:
        write_untrained_model(directory)
        return directory, f"UNTRAINED tiny model, forecasts are meaningless: {exc}"


def write_untrained_model(directory: str, seed: int = 0) -> str:
    """Write a tiny model directory with random weights (no training): only shows the pipeline working."""
    config = tiny_config(text=False)
    config.name = "untrained-tiny"
    forecaster = Forecaster.from_config(config, device="cpu", seed=seed)
    save_model_dir(directory, forecaster.config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                   forecaster.text_encoder)
    return directory

