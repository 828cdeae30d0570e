"""Frozen conditioning encoders built on ``transformers``: DINOv2 patch tokens and the CLIP pooled text embedding.

Where the weights come from, in order (``from_config(cfg, model_dir)``):

1. ``<model_dir>/image_encoder/`` (``text_encoder/``): a ``save_pretrained`` directory shipped with the model;
2. ``cfg.model_id``: a local directory (relative paths are resolved against ``model_dir`` first) or a hub id, read
   through the Hugging Face cache (offline when ``HF_HUB_OFFLINE=1``);
3. ``cfg.config`` with no ``model_id``: a randomly initialised model of that configuration (tests, demos).

Missing weights raise :class:`WeightsNotFoundError` naming the hub id and how to fetch it; there is no silent fallback
to random weights.

Preprocessing is plain torch (no image-processor, so no torchvision): rescale by 1/255 and normalise with the
ImageNet mean/std. The LIBERO recipe (``resize=False``) feeds the model image at its native resolution (128 px ->
9 x 9 = 81 tokens with dinov2-large); ``resize=True`` is the 224 px recipe (bicubic, antialiased) of the Kubric models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, Dinov2Config, Dinov2Model

from traj_forecast_ros.errors import InvalidImageError, WeightsNotFoundError
from traj_forecast_ros.model.config import IMAGE_ENCODER_DIR, TEXT_ENCODER_DIR, ImageEncoderConfig, TextEncoderConfig
from traj_forecast_ros.model.hub import hub_offline
from traj_forecast_ros.model.word_encoder import WordTextEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZED_INPUT = 224  # side of the square input in the resize recipe

# Architectures of the hub encoders the LIBERO models use, as transformers config kwargs: random-weight stand-ins
# of the right size for benchmarks and demos (``ImageEncoderConfig(model_id=None, config=DINOV2_LARGE)``).
DINOV2_LARGE: Dict[str, Any] = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                                    patch_size=14, image_size=518, layer_norm_eps=1e-6)
CLIP_L14_TEXT: Dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, projection_dim=768, max_position_embeddings=77,
                                     hidden_act="quick_gelu")

PathLike = Union[str, Path]


def resolve_source(model_id: Optional[str], model_dir: Optional[PathLike], sub_dir: str) -> Optional[str]:
    """Where to load pretrained weights from: the model dir's sub-folder, a local dir, or a hub id (None: random)."""
    if model_dir is not None:
        shipped = Path(model_dir) / sub_dir
        if shipped.is_dir():
            return str(shipped)
    if model_id is None:
        return None
    candidate = Path(model_id).expanduser()
    if model_dir is not None and not candidate.is_absolute() and (Path(model_dir) / candidate).is_dir():
        return str(Path(model_dir) / candidate)
    if candidate.is_dir():
        return str(candidate)
    return model_id  # a hub id


def _missing_weights(what: str, source: str, exc: Exception) -> WeightsNotFoundError:
    local = Path(source).expanduser()
    if local.is_absolute() or local.exists() or source.startswith("."):
        hint = f"the directory '{source}' is missing or incomplete (expected a transformers save_pretrained folder)"
    else:
        hint = (f"fetch it once with network access: `traj-forecast download <MODEL NAME>` (writes it into the model "
                f"directory) or `hf download {source}` (Hugging Face cache), then run again; offline mode is "
                f"{'on' if hub_offline() else 'off'} (HF_HUB_OFFLINE)")
    return WeightsNotFoundError(f"{what} weights '{source}' not found: {hint}. Cause: {type(exc).__name__}: {exc}")


def image_encoder_mismatch(encoder: nn.Module, image_size: Sequence[int], expected_tokens: Union[int, Sequence[int]],
                           expected_width: int) -> Optional[str]:
    """None when ``encoder`` gives the tokens a model reads for ``image_size`` images, else what differs.

    ``expected_tokens``: a count, or a ``(rows, cols)`` token grid; ``expected_width``: the feature width. The one
    check shared by the forecaster (an encoder loaded beside a model) and training (a pretrained encoder).
    """
    if not isinstance(expected_tokens, int):
        rows, cols = expected_tokens
        expected_tokens = int(rows) * int(cols)
    tokens = int(encoder.num_tokens(tuple(image_size)))
    width = int(encoder.hidden_size)
    if tokens == expected_tokens and width == int(expected_width):
        return None
    return (f"the image encoder gives {tokens} tokens x {width} for {tuple(image_size)} images, the model expects "
            f"{expected_tokens} x {expected_width}")


class ImageEncoder(nn.Module):
    """Frozen DINOv2 (``transformers.Dinov2Model``) turning uint8 RGB images into patch tokens ``[B, N, D]``."""

    def __init__(self, backbone: nn.Module, resize: bool = False, drop_cls: bool = True):
        super().__init__()
        self.backbone = backbone
        self.resize = resize
        self.drop_cls = drop_cls
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, cfg: ImageEncoderConfig, model_dir: Optional[PathLike] = None) -> "ImageEncoder":
        """Load (or, with only ``cfg.config``, randomly build) the encoder; see the module docstring for the order."""
        source = resolve_source(cfg.model_id, model_dir, IMAGE_ENCODER_DIR)
        if source is None:
            if not cfg.config:
                raise WeightsNotFoundError("image encoder: config has neither model_id nor config; set one of them")
            backbone = Dinov2Model(Dinov2Config(**cfg.config))
        else:
            try:
                backbone = Dinov2Model.from_pretrained(source)
            except (OSError, ValueError) as exc:
                raise _missing_weights("DINOv2 image encoder", source, exc) from exc
        return cls(backbone, resize=cfg.resize, drop_cls=cfg.drop_cls)

    @property
    def hidden_size(self) -> int:
        """D, the width of the patch tokens."""
        return int(self.backbone.config.hidden_size)

    @property
    def patch_size(self) -> int:
        """Pixels per patch side."""
        return int(self.backbone.config.patch_size)

    def num_tokens(self, image_size: Tuple[int, int]) -> int:
        """N, the number of patch tokens produced for a model image of ``(height, width)``."""
        height, width = (RESIZED_INPUT, RESIZED_INPUT) if self.resize else image_size
        return (height // self.patch_size) * (width // self.patch_size) + (0 if self.drop_cls else 1)

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Always stays in eval mode (frozen encoder)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 -> ``[B, 3, H', W']`` float32 normalised pixels."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidImageError(f"image encoder expects [B, H, W, 3] uint8, got {tuple(images.shape)} "
                                    f"{images.dtype}")
        pixels = images.to(self.mean.device).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
        if self.resize:
            pixels = F.interpolate(pixels, size=(RESIZED_INPUT, RESIZED_INPUT), mode="bicubic", antialias=True,
                                   align_corners=False).clamp_(0.0, 1.0)
        return (pixels - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 RGB -> ``[B, N, D]`` patch tokens (last hidden state after the final norm)."""
        pixels = self.preprocess(images)  # [B, 3, H, W]
        tokens = self.backbone(pixel_values=pixels).last_hidden_state  # [B, 1 + N, D]
        return tokens[:, 1:] if self.drop_cls else tokens

    def save_pretrained(self, path: PathLike) -> None:
        """Write the backbone as a transformers directory (loadable by :meth:`from_config` as a model dir part)."""
        self.backbone.save_pretrained(str(path))


# ------------------------------------------------------------------------------------------------ text encoder
def _byte_alphabet() -> List[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def basic_clip_tokenizer():
    """A character-level CLIP tokenizer built in-process (no files, no hub): for random-weight text encoders.

    Vocabulary: the 256 byte symbols, their end-of-word forms, then ``<|startoftext|>`` and ``<|endoftext|>`` (the
    two highest ids, as in CLIP). No merges, so every character is one token.
    """
    symbols = _byte_alphabet()
    vocab: Dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[symbol] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


class TextEncoder(nn.Module):
    """Frozen CLIP text tower (``CLIPTextModelWithProjection``): instructions -> pooled ``text_embeds [B, E]``."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 77):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, model_dir: Optional[PathLike] = None) -> nn.Module:
        """Load (or, with only ``cfg.config``, randomly build) the text tower and its tokenizer; ``cfg.kind ==
        "words"`` builds the small trained word encoder instead (:mod:`traj_forecast_ros.model.word_encoder`)."""
        if cfg.kind == "words":
            return WordTextEncoder.from_config(cfg, model_dir=model_dir)
        source = resolve_source(cfg.model_id, model_dir, TEXT_ENCODER_DIR)
        if source is None:
            if not cfg.config:
                raise WeightsNotFoundError("text encoder: config has neither model_id nor config; set one of them")
            tokenizer = basic_clip_tokenizer()
            fields = dict(cfg.config)
            fields.setdefault("bos_token_id", tokenizer.bos_token_id)
            fields.setdefault("eos_token_id", tokenizer.eos_token_id)
            fields.setdefault("pad_token_id", tokenizer.pad_token_id)
            model = CLIPTextModelWithProjection(CLIPTextConfig(**fields))
        else:
            try:
                model = CLIPTextModelWithProjection.from_pretrained(source)
                tokenizer = CLIPTokenizer.from_pretrained(source)
            except (OSError, ValueError) as exc:
                raise _missing_weights("CLIP text encoder", source, exc) from exc
        return cls(model, tokenizer, max_length=cfg.max_length)

    @property
    def embed_dim(self) -> int:
        """E, the width of the pooled projection."""
        return int(self.model.config.projection_dim)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Always stays in eval mode (frozen encoder)."""
        return super().train(False)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """``B`` instructions -> ``[B, E]`` pooled ``text_embeds`` (projected, not L2-normalised)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("TextEncoder expects a list of strings")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        output = self.model(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device))
        return output.text_embeds  # [B, E]

    def save_pretrained(self, path: PathLike) -> None:
        """Write the model and its tokenizer into one transformers directory."""
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
