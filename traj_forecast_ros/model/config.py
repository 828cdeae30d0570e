"""Typed model configuration: one YAML file describes a complete forecasting model.

A :class:`ModelConfig` holds the geometry of the task (image size, query grid, trajectory length), the latent
scale, and one sub-config per module (trajectory VAE, latent denoiser, DINOv2 image encoder, CLIP text encoder).
Named configurations (the paper's LIBERO models, the demo model, tiny test models) are in
:mod:`traj_forecast_ros.model.presets`, built from the one preset table :mod:`traj_forecast_ros.model.sizes`; the
defaults here are that table's ``libero-atm`` line (:data:`~traj_forecast_ros.model.sizes.LIBERO`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from traj_forecast_ros.model.sizes import LIBERO

Size2 = Tuple[int, int]

# File names inside a model directory (see traj_forecast_ros.model.checkpoint.save_model_dir).
CONFIG_FILE = "config.yaml"
DENOISER_FILE = "denoiser.safetensors"
VAE_FILE = "vae.safetensors"
IMAGE_ENCODER_DIR = "image_encoder"
TEXT_ENCODER_DIR = "text_encoder"


LIBERO_FRAME_TOKENS = (LIBERO.image // LIBERO.image_encoder.patch_or_embed) ** 2  # DINOv2-L/14 on 128 px: 81


def as_pair(value: Union[int, Tuple[int, int], List[int]]) -> Size2:
    """Return ``(rows, cols)`` for an int (square) or a 2-sequence."""
    if isinstance(value, int):
        return (value, value)
    rows, cols = value
    return (int(rows), int(cols))


@dataclass
class VAEConfig:
    """Hyperparameters of the trajectory VAE (LatteVAE in the official code); defaults: LIBERO's."""

    input_size: Union[int, Size2] = LIBERO.grid  # query grid rows x cols
    patch_size: int = LIBERO.vae.patch
    hidden_size: int = LIBERO.vae.width
    encoder_depth: int = LIBERO.vae.depth
    decoder_depth: int = LIBERO.vae.depth
    num_heads: int = LIBERO.vae.heads
    in_channels: int = 2
    latent_channels: int = LIBERO.vae.latents
    num_frames: int = LIBERO.frames
    num_frame_tokens: Union[int, Size2] = LIBERO_FRAME_TOKENS  # DINO token grid (int: square side**2, or (rows, cols))
    frame_features_dim: int = LIBERO.image_encoder.width
    mlp_ratio: float = 4.0
    pos_embed_dim: int = LIBERO.vae.fourier  # LFF feature size of the track position encoder
    beta: float = 1.0  # KL weight (training only)


@dataclass
class DenoiserConfig:
    """Hyperparameters of the Latte-style denoiser (latent or raw); defaults: LIBERO's."""

    input_size: Union[int, Size2] = LIBERO.grid // LIBERO.vae.patch  # latent grid rows x cols (raw: query grid)
    patch_size: int = LIBERO.denoiser.patch
    in_channels: int = LIBERO.vae.latents
    hidden_size: int = LIBERO.denoiser.width
    depth: int = LIBERO.denoiser.depth
    num_heads: int = LIBERO.denoiser.heads
    num_frames: int = LIBERO.frames
    num_frame_tokens: Union[int, Size2] = LIBERO_FRAME_TOKENS
    frame_features_dim: int = LIBERO.image_encoder.width
    text_embed_dim: Optional[int] = LIBERO.text_encoder.patch_or_embed  # None: no language conditioning
    # True: the instruction embedding is also one extra token of every block's cross-attention context, so each
    # latent token reads it by its own content (the pooled embedding added to the timestep only scales every
    # token alike). Not in the paper's architecture: LIBERO's checkpoints leave it off.
    text_context: bool = False
    # True: a map of where the instruction points in the image (image tokens times the instruction, pooled onto
    # the latent token grid) is added to every frame's latent tokens (``model.denoiser.TextGrounding``). Not in the
    # paper's architecture either: LIBERO's checkpoints leave it off.
    text_grounding: bool = False
    mlp_ratio: float = 4.0
    latent: bool = True  # False: raw variant with a track position encoder (x_encoder)
    pos_embed_dim: int = 128  # raw variant only


@dataclass
class ImageEncoderConfig:
    """DINOv2 image encoder. ``model_id`` is a hub id or local dir; ``config`` builds a random one (tests)."""

    model_id: Optional[str] = LIBERO.image_encoder.hub_id
    config: Optional[Dict[str, Any]] = None  # kwargs for transformers.Dinov2Config (used when no weights)
    resize: bool = False  # LIBERO recipe: native resolution, no resize / crop
    drop_cls: bool = True


TEXT_ENCODER_KINDS = ("clip", "words")


@dataclass
class TextEncoderConfig:
    """Text tower producing the pooled instruction embedding (``text_embeds``).

    ``kind="clip"``: a frozen CLIP text tower (``model_id`` or random from ``config``). ``kind="words"``: a small
    word-level encoder trained with the denoiser on a closed instruction set (``config``: ``vocab``, ``width``,
    ``layers``, ``heads``, ``embed_dim``; :mod:`traj_forecast_ros.model.word_encoder`)."""

    model_id: Optional[str] = LIBERO.text_encoder.hub_id
    config: Optional[Dict[str, Any]] = None  # kwargs for transformers.CLIPTextConfig (tests), or the words encoder's
    max_length: int = 77
    kind: str = "clip"

    def __post_init__(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"text_encoder.kind must be one of {list(TEXT_ENCODER_KINDS)}, got {self.kind!r}")


LATENT_DRAWS = ("sample", "mean")
MAX_GUIDANCE_SCALE = 20.0
OFFICIAL_STEPS = 10  # the paper's Euler time points (9 denoiser evaluations): every model's default unless set


def check_guidance_scale(scale: Any) -> float:
    """``scale`` as a float in [0, MAX_GUIDANCE_SCALE] (1 = plain conditional sampling, 0 = unconditional);
    ``ValueError`` otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}")
    if not 0.0 <= scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE_SCALE:g}], got {scale}")
    return float(scale)


@dataclass
class ModelConfig:
    """A complete forecasting model: geometry, latent scale and all sub-modules."""

    name: str = "libero-atm"
    image_size: Size2 = (LIBERO.image, LIBERO.image)  # (height, width) the model sees
    query_grid: Size2 = (LIBERO.grid, LIBERO.grid)  # (rows, cols) of query points
    query_stride: float = LIBERO.image / LIBERO.grid  # pixels between query points
    query_offset: float = LIBERO.offset  # pixel coordinate of the first query point (x and y)
    num_frames: int = LIBERO.frames
    latent_scale: Optional[List[float]] = None  # per-channel std of the VAE latents; vae_scale = 1 / latent_scale
    default_instruction: str = ""
    vae: Optional[VAEConfig] = field(default_factory=VAEConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: Optional[TextEncoderConfig] = field(default_factory=TextEncoderConfig)
    frame_interval_s: Optional[float] = None  # time between forecast frames when known
    # What stage 2 generates and conditions on: "sample" = posterior draws mean + std * eps (the official recipe),
    # "mean" = posterior means (a deterministic conditioning frame; for small VAEs whose posterior noise is large).
    latent_draw: str = "sample"
    # Classifier-free guidance: the instruction whose embedding is the unconditional one ("" for models trained with
    # instruction dropout), None for models trained without it (the LIBERO checkpoints: no guidance).
    null_instruction: Optional[str] = None
    guidance_scale: float = 1.0  # the model's default guidance (1 = none), chosen by measurement
    default_steps: int = OFFICIAL_STEPS  # Euler time points when the caller gives none

    def __post_init__(self) -> None:
        if self.latent_draw not in LATENT_DRAWS:
            raise ValueError(f"latent_draw must be one of {list(LATENT_DRAWS)}, got {self.latent_draw!r}")
        check_guidance_scale(self.guidance_scale)
        if isinstance(self.default_steps, bool) or not isinstance(self.default_steps, int) or self.default_steps < 2:
            raise ValueError(f"default_steps counts Euler time points (>= 2), got {self.default_steps!r}")
        if self.guidance_scale != 1.0 and not self.supports_guidance:
            raise ValueError("guidance_scale != 1 needs null_instruction and a text encoder (a model trained with "
                             "instruction dropout)")

    @property
    def supports_guidance(self) -> bool:
        """Whether the model has an unconditional instruction embedding for classifier-free guidance."""
        return self.null_instruction is not None and self.text_encoder is not None

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> Dict[str, Any]:
        """Plain-python dict (YAML friendly)."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["query_grid"] = list(self.query_grid)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        sub = {
            "vae": VAEConfig,
            "denoiser": DenoiserConfig,
            "image_encoder": ImageEncoderConfig,
            "text_encoder": TextEncoderConfig,
        }
        for key, sub_cls in sub.items():
            if key in data and data[key] is not None and not isinstance(data[key], sub_cls):
                sub_known = {f.name for f in dataclasses.fields(sub_cls)}
                bad = set(data[key]) - sub_known
                if bad:
                    raise ValueError(f"unknown keys in model config '{key}': {sorted(bad)}")
                fields = dict(data[key])
                for size_key in ("input_size", "num_frame_tokens"):
                    if isinstance(fields.get(size_key), list):
                        fields[size_key] = tuple(fields[size_key])
                data[key] = sub_cls(**fields)
        for key in ("image_size", "query_grid"):
            if isinstance(data.get(key), int) and not isinstance(data[key], bool):
                data[key] = (data[key], data[key])
            elif isinstance(data.get(key), list):
                data[key] = tuple(data[key])  # entries and length checked by config_problems
        config = cls(**data)
        problems = config_problems(config)
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        return config

    def save_yaml(self, path: Union[str, Path]) -> None:
        """Write this config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: Union[str, Path]) -> "ModelConfig":
        """Read a config written by :meth:`save_yaml` (or by hand)."""
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a model config (expected a mapping)")
        return cls.from_dict(data)

    @property
    def vae_scale(self) -> Optional[List[float]]:
        """Multiplier applied to VAE latents before the denoiser (``1 / latent_scale``)."""
        if self.latent_scale is None:
            return None
        return [1.0 / s for s in self.latent_scale]


# ---------------------------------------------------------------------------------------------- validation
# Upper bounds that keep a hostile config from asking for absurd allocations before its weights are compared
# (model.checkpoint compares the weights' shapes with the config before any module gets memory).
MAX_WIDTH = 65536  # hidden sizes, channels, feature and embedding widths
MAX_DEPTH = 256  # transformer blocks
MAX_SIDE = 8192  # image sides, grid sides, token counts
MAX_FRAMES = 1024
MAX_TABLE = 2**24  # entries of one fixed sin-cos table (tokens or frames x hidden_size); LIBERO's largest: 2**21
_DEPTH_FIELDS = frozenset({"depth", "encoder_depth", "decoder_depth"})
_FRAME_FIELDS = frozenset({"num_frames"})
_SIDE_FIELDS = frozenset({"input_size", "image_size", "query_grid", "num_frame_tokens", "patch_size", "max_length"})
_POSITIVE_FLOATS = frozenset({"query_stride", "mlp_ratio", "frame_interval_s"})


def _int_problem(where: str, value: Any, name: str) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{where} must be an integer, got {type(value).__name__} {value!r}"
    if name in _DEPTH_FIELDS:
        high = MAX_DEPTH
    elif name in _FRAME_FIELDS:
        high = MAX_FRAMES
    elif name in _SIDE_FIELDS:
        high = MAX_SIDE * MAX_SIDE if name == "num_frame_tokens" else MAX_SIDE
    else:
        high = MAX_WIDTH
    if not 1 <= value <= high:
        return f"{where} must be in [1, {high}], got {value}"
    return None


def _float_problem(where: str, value: Any, name: str) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{where} must be a finite number, got {type(value).__name__} {value!r}"
    if name in _POSITIVE_FLOATS and value <= 0:
        return f"{where} must be > 0, got {value}"
    if name == "beta" and value < 0:
        return f"{where} must be >= 0, got {value}"
    return None


def _value_problem(where: str, value: Any, hint: Any, name: str) -> Optional[str]:
    """Why ``value`` does not fit the type ``hint`` (and the range of field ``name``), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        problems = [_value_problem(where, value, arg, name) for arg in options]
        return None if any(problem is None for problem in problems) else problems[-1]
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"{where} must be a list, got {type(value).__name__} {value!r}"
        if origin is tuple and len(value) != len(args):
            return f"{where} must have {len(args)} entries, got {len(value)}"
        item_hints = args if origin is tuple else args * len(value)
        for index, (item, item_hint) in enumerate(zip(value, item_hints)):
            problem = _value_problem(f"{where}[{index}]", item, item_hint, name)
            if problem:
                return problem
        return None
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else f"{where} must be a mapping, got {type(value).__name__}"
    if hint is int:
        return _int_problem(where, value, name)
    if hint is float:
        return _float_problem(where, value, name)
    if hint is bool:
        return None if isinstance(value, bool) else f"{where} must be true or false, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"{where} must be a string, got {type(value).__name__} {value!r}"
    return None


def _fields_problems(section: Any, prefix: str) -> List[str]:
    hints = typing.get_type_hints(type(section))
    problems = []
    for spec in dataclasses.fields(section):
        if dataclasses.is_dataclass(getattr(section, spec.name)):
            continue  # sub-configs are checked on their own
        problem = _value_problem(f"{prefix}{spec.name}", getattr(section, spec.name), hints[spec.name], spec.name)
        if problem:
            problems.append(problem)
    return problems


def config_problems(config: "ModelConfig") -> List[str]:
    """Every type, range and consistency problem of ``config`` (empty when it can be built). Cheap: no module is
    built, so a hostile config is refused before it can ask for memory."""
    problems = _fields_problems(config, "")
    for name in ("vae", "denoiser", "image_encoder", "text_encoder"):
        section = getattr(config, name)
        if section is not None:
            problems += _fields_problems(section, f"{name}.")
    if problems:
        return problems  # the checks below assume the types are right
    for name, section in (("vae", config.vae), ("denoiser", config.denoiser)):
        if section is None:
            continue
        if section.hidden_size % section.num_heads:
            problems.append(f"{name}.hidden_size {section.hidden_size} is not a multiple of num_heads "
                            f"{section.num_heads}")
        rows, cols = as_pair(section.input_size)
        if rows % section.patch_size or cols % section.patch_size:
            problems.append(f"{name}.input_size {section.input_size} is not a multiple of patch_size "
                            f"{section.patch_size}")
        frame_rows, frame_cols = (section.num_frame_tokens, 1) if isinstance(section.num_frame_tokens, int) \
            else section.num_frame_tokens
        longest = max(rows * cols // section.patch_size**2, frame_rows * frame_cols, section.num_frames)
        if longest * section.hidden_size > MAX_TABLE:
            problems.append(f"{name}: a fixed sin-cos table of {longest} x {section.hidden_size} entries is above "
                            f"{MAX_TABLE} (tokens, frames or hidden_size too large)")
    if config.latent_scale is not None:
        if any(scale <= 0 for scale in config.latent_scale):
            problems.append(f"latent_scale entries must be > 0, got {config.latent_scale}")
        if config.vae is not None and len(config.latent_scale) != config.vae.latent_channels:
            problems.append(f"latent_scale has {len(config.latent_scale)} entries, vae.latent_channels is "
                            f"{config.vae.latent_channels}")
    return problems
