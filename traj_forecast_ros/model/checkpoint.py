"""Loading and saving model weights: the official ``.pth`` checkpoints and our model directories.

Official checkpoints (spec section 6) are ``torch.save`` dicts whose ``model_state_dict`` carries DDP
(``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes; they hold no config. A model directory holds
``config.yaml`` + ``denoiser.safetensors`` (+ ``vae.safetensors``, ``image_encoder/``, ``text_encoder/``).
Every failure is a :class:`CheckpointError` (:class:`WeightsNotFoundError` for missing files) naming the file.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torch.overrides import TorchFunctionMode

from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.model.config import (  # the model-directory file names are also imported from here
    CONFIG_FILE,
    DENOISER_FILE,
    IMAGE_ENCODER_DIR,
    TEXT_ENCODER_DIR,
    VAE_FILE,
    ModelConfig,
)
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.vae import TrajectoryVAE

LOGGER = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module", "_orig_mod")  # DDP and torch.compile wrappers
MAX_LISTED_KEYS = 5
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------- state dicts
def strip_prefixes(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop every ``module.`` and ``_orig_mod.`` key component (DDP / torch.compile), in any order and number."""
    stripped: Dict[str, Any] = {}
    for key, value in state_dict.items():
        clean = ".".join(part for part in key.split(".") if part not in WRAPPER_PREFIXES)
        if clean in stripped:
            raise CheckpointError(f"state dict has two entries for '{clean}' once wrapper prefixes are removed")
        stripped[clean] = value
    return stripped


def build_modules(config: ModelConfig) -> Tuple[LatteDenoiser, Optional[TrajectoryVAE]]:
    """Randomly initialised (denoiser, vae) for a config; vae is None for raw models (``config.vae is None``)."""
    denoiser = LatteDenoiser(config.denoiser)
    vae = TrajectoryVAE(config.vae) if config.vae is not None else None
    return denoiser, vae


RANDOM_INIT_STD = 0.02  # std given to zero-initialised parameters of random-weight models


def randomise_zero_parameters(module: nn.Module, generator: torch.Generator,
                              std: float = RANDOM_INIT_STD) -> int:
    """Give every trainable all-zero parameter (adaLN-Zero, gates, output heads, biases) N(0, std) values.

    A freshly initialised DiT/VAE outputs constants (its output layers start at zero), which makes a random-weight
    model useless for tests and demos: afterwards the output depends on the noise, the image and the text.
    Returns the number of tensors changed.
    """
    changed = 0
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad and not bool(parameter.any()):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
                changed += 1
    return changed


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f", ... (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def _guess_kind(keys: Iterable[str]) -> Optional[str]:
    """Name the architecture a key set belongs to, for hints when files are swapped."""
    keys = list(keys)
    if any(key.startswith(("encoder_blocks.", "decoder_blocks.")) for key in keys):
        return "trajectory VAE"
    if any(key.startswith("blocks.") and ".adaLN_modulation." in key for key in keys):
        return "denoiser"
    return None


def _architecture_problems(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Missing / unexpected keys and shape mismatches of ``state_dict`` against ``module``."""
    return _shape_problems({key: tuple(value.shape) for key, value in module.state_dict().items()},
                           {key: tuple(value.shape) for key, value in state_dict.items()}, "model")


def _shape_problems(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]],
                    expected_from: str) -> List[str]:
    """Missing / unexpected keys and shape mismatches of a file's ``found`` shapes against ``expected`` (named by
    ``expected_from``: "model", "config")."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    mismatched = [f"{key}: file {list(found[key])} vs {expected_from} {list(expected[key])}"
                  for key in sorted(set(expected) & set(found)) if tuple(found[key]) != tuple(expected[key])]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        shown = "; ".join(mismatched[:MAX_LISTED_KEYS])
        more = f"; ... (+{len(mismatched) - MAX_LISTED_KEYS} more)" if len(mismatched) > MAX_LISTED_KEYS else ""
        problems.append(f"shape mismatches {len(mismatched)}: {shown}{more}")
    return problems


def load_into_extended(extended: nn.Module, state_dict: Mapping[str, Any], new_prefixes: Sequence[str],
                       what: str) -> None:
    """Load a trained module's ``state_dict`` into ``extended``: the same architecture plus new modules whose keys
    start with ``new_prefixes`` (they keep their initialisation). Anything else missing or unexpected: ValueError."""
    missing, unexpected = extended.load_state_dict(state_dict, strict=False)
    if unexpected or any(not key.startswith(tuple(new_prefixes)) for key in missing):
        raise ValueError(f"cannot extend this {what} with {', '.join(new_prefixes)}: missing {missing}, "
                         f"unexpected {unexpected}")


def load_state_dict_into(module: nn.Module, state_dict: Mapping[str, Any], source: PathLike, what: str) -> None:
    """Strictly load ``state_dict`` (wrapper prefixes removed) into ``module``, or raise ``CheckpointError``.

    Checks, in order: every value is a tensor; keys and shapes match the architecture exactly; every floating
    tensor is finite. Afterwards the fixed sin-cos tables are compared with the ones the module builds (a mismatch
    only logs a warning: the checkpoint's values are kept).
    """
    state_dict = strip_prefixes(state_dict)
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: not a {what} state dict; non-tensor entries {_listing(not_tensors)}")
    problems = _architecture_problems(module, state_dict)
    if problems:
        kind = _guess_kind(state_dict)
        hint = f" The file looks like a {kind} checkpoint." if kind and kind != what else ""
        raise CheckpointError(
            f"{source}: does not match the {what} architecture of the config ({'; '.join(problems)}).{hint} "
            "Check that the config (sizes, grid, frames, text conditioning) belongs to this checkpoint."
        )
    non_finite = [
        key for key, value in state_dict.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if non_finite:
        raise CheckpointError(f"{source}: {what} weights hold NaN/Inf values in tensors {_listing(non_finite)}")
    module.load_state_dict(state_dict, strict=True)
    _warn_on_table_mismatch(module, source)


def _warn_on_table_mismatch(module: nn.Module, source: PathLike) -> None:
    tables = getattr(module, "sincos_tables", None)
    if tables is None:
        return
    for name, expected in tables().items():
        loaded = getattr(module, name).detach().float().cpu()
        if not torch.allclose(loaded, expected, atol=1e-5, rtol=0.0):
            error = (loaded - expected).abs().max().item()
            LOGGER.warning("%s: fixed table '%s' differs from the MAE sin-cos table this architecture builds "
                           "(max abs difference %.3g); keeping the checkpoint's values", source, name, error)


# ---------------------------------------------------------------------------------------------- official .pth
def read_torch_checkpoint(path: PathLike, state_dict_key: str = "model_state_dict") -> Dict[str, Any]:
    """The state dict inside an official ``.pth`` (``torch.load(weights_only=True)``), or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path}: refused by torch.load(weights_only=True): it holds Python objects other than tensors and "
                f"plain containers; re-save it as a plain state dict ({str(exc).splitlines()[0]})"
            ) from exc
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, ValueError, ... on damaged files
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict (checkpoint or state dict), got {type(content).__name__}")
    if state_dict_key in content:
        state_dict = content[state_dict_key]
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path}: '{state_dict_key}' is a {type(state_dict).__name__}, not a state dict")
        return state_dict
    if content and all(isinstance(value, torch.Tensor) for value in content.values()):
        return content  # a bare state dict
    raise CheckpointError(
        f"{path}: no '{state_dict_key}' entry and not a bare state dict (top-level keys: {_listing(content)})"
    )


def load_official(
    config: ModelConfig,
    denoiser_path: PathLike,
    vae_path: Optional[PathLike] = None,
    state_dict_key: str = "model_state_dict",
) -> Tuple[LatteDenoiser, Optional[TrajectoryVAE]]:
    """Build the modules of ``config`` and strictly load the official denoiser (and VAE) ``.pth`` files.

    ``vae_path`` is required when the config has a VAE and must be None for raw models. ``state_dict_key`` picks
    the denoiser weights (``"ema_state_dict"`` for EMA weights where a trainer saved them). Returns modules in eval
    mode on the CPU.
    """
    if config.vae is not None and vae_path is None:
        raise WeightsNotFoundError(f"model '{config.name}' is a latent model: the VAE checkpoint path is required")
    if config.vae is None and vae_path is not None:
        raise CheckpointError(f"model '{config.name}' is a raw model (no VAE in its config) but a VAE checkpoint "
                              f"was given: {vae_path}")
    denoiser, vae = build_modules(config)
    load_state_dict_into(denoiser, read_torch_checkpoint(denoiser_path, state_dict_key), denoiser_path, "denoiser")
    if vae is not None and vae_path is not None:
        load_state_dict_into(vae, read_torch_checkpoint(vae_path), vae_path, "trajectory VAE")
        vae.eval()
    return denoiser.eval(), vae


# ---------------------------------------------------------------------------------------------- model directories
def save_tensors(module: nn.Module, path: Path) -> None:
    """Write ``module``'s state dict (CPU, contiguous) to a safetensors file atomically (``.partial`` + rename)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_safetensors(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)


def save_model_dir(
    directory: PathLike,
    config: ModelConfig,
    denoiser: nn.Module,
    vae: Optional[nn.Module],
    image_encoder: Optional[Any] = None,
    text_encoder: Optional[Any] = None,
) -> Path:
    """Write a model directory: config.yaml, denoiser.safetensors, vae.safetensors (latent models) and, when
    given, ``image_encoder/`` and ``text_encoder/`` through the encoders' ``save_pretrained``. Returns the path."""
    if (config.vae is None) != (vae is None):
        raise ValueError("config and modules disagree: pass a VAE exactly when config.vae is set")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_yaml(directory / CONFIG_FILE)
    save_tensors(denoiser, directory / DENOISER_FILE)
    if vae is not None:
        save_tensors(vae, directory / VAE_FILE)
    if image_encoder is not None:
        image_encoder.save_pretrained(directory / IMAGE_ENCODER_DIR)
    if text_encoder is not None:
        text_encoder.save_pretrained(directory / TEXT_ENCODER_DIR)
    return directory


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU (``WeightsNotFoundError`` / ``CheckpointError`` naming it)."""
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc


def load_model_config(directory: PathLike) -> ModelConfig:
    """The ``ModelConfig`` of a model directory (``WeightsNotFoundError`` / ``CheckpointError`` on failure)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsNotFoundError(f"model directory not found: {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsNotFoundError(f"model directory has no {CONFIG_FILE}: {config_path}")
    try:
        return ModelConfig.load_yaml(config_path)
    except Exception as exc:  # yaml errors, unknown keys, wrong types
        raise CheckpointError(f"{config_path}: not a valid model config: {exc}") from exc


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header only (no tensor is read)."""
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from exc


class _ShapesOnly(TorchFunctionMode):
    """Inside ``torch.device("meta")``: meta tensors hold no values, so the weight initialisers' in-place ops
    (``normal_``, ``copy_``, ...) on them are skipped, ``randn``/``rand`` give empty meta tensors, and ``arange``
    (the fixed sin-cos tables, bounded in size by :func:`~traj_forecast_ros.model.config.config_problems`) runs on the
    CPU. On meta tensors these would go through torch's Python reference kernels, whose first use imports torch's
    compiler (about 2 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, target = getattr(func, "__name__", ""), args[0] if args else kwargs.get("tensor")  # nn.init: tensor=
        in_place = name.endswith("_") and not name.endswith("__")  # normal_, copy_, zero_; not __bool__
        if in_place and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        if func is torch.arange and kwargs.get("device") is None:
            kwargs = dict(kwargs, device="cpu")
        elif func in (torch.randn, torch.rand) and kwargs.get("device") is None:
            return torch.empty(*args, dtype=kwargs.get("dtype"), device="meta")  # random values: none needed
        return func(*args, **kwargs)


def expected_shapes(config: ModelConfig) -> Tuple[Dict[str, Tuple[int, ...]], Optional[Dict[str, Tuple[int, ...]]]]:
    """State-dict shapes (denoiser, vae or None) that ``config`` implies, from modules built on the meta device
    (no memory is allocated, whatever sizes the config names)."""
    try:
        with torch.device("meta"), _ShapesOnly():
            denoiser, vae = build_modules(config)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as exc:
        raise CheckpointError(f"model '{config.name}': the config does not describe a buildable model: "
                              f"{type(exc).__name__}: {exc}") from exc
    shapes = ({key: tuple(value.shape) for key, value in module.state_dict().items()} if module is not None else None
              for module in (denoiser, vae))
    return tuple(shapes)  # type: ignore[return-value]


def _check_header(path: Path, expected: Mapping[str, Tuple[int, ...]], what: str) -> None:
    """Compare a weights file's header (names and shapes, wrapper prefixes removed) with the config's modules."""
    found = strip_prefixes(safetensors_shapes(path))
    problems = _shape_problems(expected, found, "config")
    if problems:
        kind = _guess_kind(found)
        hint = f" The file looks like a {kind} checkpoint." if kind and kind != what else ""
        raise CheckpointError(f"{path}: does not match the {what} architecture of the config "
                              f"({'; '.join(problems)}).{hint} Check that the config (sizes, grid, frames, text "
                              "conditioning) belongs to this checkpoint.")


def check_model_dir_shapes(directory: PathLike, config: ModelConfig) -> None:
    """Refuse a model directory whose weight files (headers only) disagree with its config, before any module is
    built with memory: a config that names a huge model fails here in milliseconds."""
    directory = Path(directory)
    denoiser_shapes, vae_shapes = expected_shapes(config)
    _check_header(directory / DENOISER_FILE, denoiser_shapes, "denoiser")
    if vae_shapes is not None:
        _check_header(directory / VAE_FILE, vae_shapes, "trajectory VAE")


def load_model_dir(directory: PathLike) -> Tuple[ModelConfig, LatteDenoiser, Optional[TrajectoryVAE]]:
    """Read a directory written by :func:`save_model_dir`: (config, denoiser, vae or None), eval mode, CPU.
    The config is validated and the weights' shapes compared with it (headers only) before anything is built."""
    directory = Path(directory)
    config = load_model_config(directory)
    check_model_dir_shapes(directory, config)
    denoiser, vae = build_modules(config)
    denoiser_path = directory / DENOISER_FILE
    load_state_dict_into(denoiser, read_safetensors(denoiser_path), denoiser_path, "denoiser")
    vae_path = directory / VAE_FILE
    if vae is not None:
        load_state_dict_into(vae, read_safetensors(vae_path), vae_path, "trajectory VAE")
        vae.eval()
    elif vae_path.exists():
        raise CheckpointError(f"{vae_path}: the config describes a raw model (vae: null) but the directory holds VAE "
                              "weights; fix the config or remove the file")
    return config, denoiser.eval(), vae


def export_official(
    config: ModelConfig,
    denoiser_path: PathLike,
    vae_path: Optional[PathLike],
    out_dir: PathLike,
    image_encoder: Optional[Any] = None,
    text_encoder: Optional[Any] = None,
) -> Path:
    """Convert official ``.pth`` checkpoints into a model directory (:func:`load_official` + :func:`save_model_dir`)."""
    denoiser, vae = load_official(config, denoiser_path, vae_path)
    return save_model_dir(out_dir, config, denoiser, vae, image_encoder, text_encoder)
