"""Pretrain the image encoder on simulator frames with dense heads (depth + segmentation), then freeze it.

No pretrained DINOv2 is reachable offline, and a random frozen encoder gives the denoiser little to condition on.
The simulator labels every frame for free, so the model's own DINOv2-shaped ViT (the ``image_encoder.config`` of
the model config: patch tokens ``[B, N, D]`` exactly as the forecaster and the training stages read them) is trained
here to predict, from its patch tokens alone:

* per-pixel metric depth (L1 in metres on pixels that show geometry, depth clipped at :data:`DEPTH_CLIP_M`);
* per-pixel segmentation classes (cross-entropy over the dataset's ``segmentation_classes``: empty, static fixture,
  robot, each movable object), each class weighted by ``1 / sqrt(its pixel share)`` in the training set (normalised
  to a pixel-weighted mean of 1), so the small objects are not drowned by the static table and walls.

The heads are linear maps from each patch token to its ``patch x patch`` pixels (depth) and class logits, so
everything they predict has to be in the tokens. Augmentation: a random horizontal flip per image (from the step's
generator, so a resumed run is identical). ``frozen_backbone=True`` trains the heads only on the frozen random
encoder: a linear probe of the random baseline on the same budget.

Run directory: ``image_encoder/`` (a transformers ``save_pretrained`` folder, ``model.safetensors``), which
``traj-forecast train vae --encoder DIR`` (and so the model directory, and the forecaster) loads frozen;
``heads.safetensors``, ``config.yaml`` (the model config the encoder belongs to), ``encoder.json`` (settings and
final metrics), ``checkpoints/``, ``metrics.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.errors import DatasetError
from traj_forecast_ros.model.checkpoint import (
    CONFIG_FILE,
    IMAGE_ENCODER_DIR,
    load_model_config,
    load_state_dict_into,
    read_safetensors,
    save_tensors,
)
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.train.common import TrainSettings, distributed
from traj_forecast_ros.train.data import build_image_encoder
from traj_forecast_ros.train.trainer import Trainer

log = logging.getLogger(__name__)

DEPTH_CLIP_M = 4.0  # far background (walls, sky) is clipped to this depth in the target
HEADS_FILE = "heads.safetensors"
SUMMARY_FILE = "encoder.json"
EVAL_BATCH = 32
PathLike = Union[str, Path]


class DenseHeads(nn.Module):
    """Patch tokens ``[B, h*w, D]`` -> depth ``[B, h*p, w*p]`` and class logits ``[B, C, h*p, w*p]`` (linear)."""

    def __init__(self, width: int, patch: int, num_classes: int) -> None:
        super().__init__()
        self.patch = int(patch)
        self.num_classes = int(num_classes)
        self.norm = nn.LayerNorm(width)
        self.depth = nn.Linear(width, patch * patch)
        self.segmentation = nn.Linear(width, patch * patch * num_classes)

    def _unpatchify(self, values: torch.Tensor, grid: Tuple[int, int], channels: int) -> torch.Tensor:
        rows, cols = grid
        batch, p = values.shape[0], self.patch
        values = values.reshape(batch, rows, cols, p, p, channels)  # (B, h, w, p, p, C)
        return values.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows * p, cols * p)  # (B, C, H, W)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.norm(tokens)  # (B, N, D)
        depth = self._unpatchify(self.depth(hidden), grid, 1)[:, 0]  # (B, H, W)
        logits = self._unpatchify(self.segmentation(hidden), grid, self.num_classes)  # (B, C, H, W)
        return depth, logits


class EncoderPretraining(nn.Module):
    """The image encoder's backbone plus :class:`DenseHeads`; ``forward(images, depth, segmentation, generator)
    -> dict(loss, depth_l1_m, segmentation_ce, segmentation_acc)``."""

    def __init__(self, encoder: nn.Module, num_classes: int, depth_weight: float = 1.0,
                 frozen_backbone: bool = False, class_weights: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        weights = torch.ones(num_classes) if class_weights is None else torch.as_tensor(class_weights).float()
        self.register_buffer("class_weights", weights, persistent=False)  # (C,)
        self.encoder = encoder
        self.encoder.backbone.requires_grad_(not frozen_backbone)
        self.heads = DenseHeads(encoder.hidden_size, encoder.patch_size, num_classes)
        self.depth_weight = float(depth_weight)

    def predict(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, W, 3]`` uint8 -> depth ``[B, H', W']`` metres and logits ``[B, C, H', W']`` (H' = patches * p)."""
        pixels = self.encoder.preprocess(images)  # (B, 3, H, W)
        tokens = self.encoder.backbone(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, N, D), CLS dropped
        patch = self.encoder.patch_size
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        return self.heads(tokens, grid)

    def forward(self, images: torch.Tensor, depth: torch.Tensor, segmentation: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        if generator is not None:  # random horizontal flip of image and labels together
            flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
            flip = flip.to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(2), images)
            depth = torch.where(flip[:, None, None], depth.flip(2), depth)
            segmentation = torch.where(flip[:, None, None], segmentation.flip(2), segmentation)
        pred_depth, logits = self.predict(images)
        rows, cols = pred_depth.shape[1:]
        depth = depth[:, :rows, :cols].float().clamp(max=DEPTH_CLIP_M)  # (B, H', W')
        segmentation = segmentation[:, :rows, :cols].long()  # (B, H', W')
        valid = (segmentation != 0).float()  # class 0 = nothing drawn: no depth target
        depth_l1 = ((pred_depth.float() - depth).abs() * valid).sum() / valid.sum().clamp(min=1.0)
        ce = F.cross_entropy(logits.float(), segmentation, weight=self.class_weights)
        accuracy = (logits.argmax(1) == segmentation).float().mean()
        return {"loss": self.depth_weight * depth_l1 + ce, "depth_l1_m": depth_l1.detach(),
                "segmentation_ce": ce.detach(), "segmentation_acc": accuracy.detach()}


def _check_labels(dataset: TrajectoryDataset, config: ModelConfig) -> int:
    """Number of segmentation classes; ``DatasetError`` when the dataset has no dense labels or another size."""
    missing = [name for name in ("depth", "segmentation") if not dataset.has(name)]
    if missing or not dataset.meta.segmentation_classes:
        raise DatasetError(f"{dataset.root}: encoder pretraining needs the dense labels 'depth' and 'segmentation' "
                           f"(missing {missing or ['segmentation_classes']}); generate with `traj-forecast data "
                           "sim-manipulation` (dense labels are on by default)")
    if tuple(dataset.meta.image_size) != tuple(config.image_size):
        raise DatasetError(f"dataset images {tuple(dataset.meta.image_size)} vs model {tuple(config.image_size)}")
    return len(dataset.meta.segmentation_classes)


def class_weights_of(dataset: TrajectoryDataset, num_classes: int) -> torch.Tensor:
    """``[C]`` cross-entropy weights ``1 / sqrt(share)`` of each class's pixel share in ``dataset`` (absent classes
    weigh 0), scaled so that the pixel-weighted mean weight is 1."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for shard in dataset.iter_shards():
        counts += np.bincount(np.asarray(shard.segmentation).ravel(), minlength=num_classes)[:num_classes]
    share = counts / max(counts.sum(), 1.0)
    weights = np.where(share > 0, 1.0 / np.sqrt(np.maximum(share, 1e-12)), 0.0)
    weights /= max(float((weights * share).sum()), 1e-12)
    return torch.from_numpy(weights.astype(np.float32))


def label_batch(dataset: TrajectoryDataset, indices: np.ndarray) -> Dict[str, torch.Tensor]:
    """``images [B, H, W, 3]`` uint8, ``depth [B, H, W]`` float32, ``segmentation [B, H, W]`` int64 of samples."""
    indices = np.asarray(indices)
    return {
        "images": torch.from_numpy(dataset.gather("images", indices)),
        "depth": torch.from_numpy(dataset.gather("depth", indices).astype(np.float32)),
        "segmentation": torch.from_numpy(dataset.gather("segmentation", indices).astype(np.int64)),
    }


def train_encoder(data_dir: PathLike, out_dir: PathLike, config: ModelConfig, settings: TrainSettings,
                  resume: bool = False, frozen_backbone: bool = False, depth_weight: float = 1.0) -> Dict[str, float]:
    """Pretrain ``config.image_encoder`` (random init, seeded) on a labelled dataset and write the run directory.

    ``frozen_backbone``: train only the heads (a probe of the random encoder on the same budget). Returns the last
    logged values.
    """
    out_dir = Path(out_dir)
    dataset = TrajectoryDataset(data_dir)
    num_classes = _check_labels(dataset, config)
    with distributed(settings.device) as info:
        encoder = build_image_encoder(config, seed=settings.seed)
        torch.manual_seed(settings.seed)
        weights = class_weights_of(dataset, num_classes)
        log.info("segmentation class weights: %s", [round(float(w), 3) for w in weights])
        objective = EncoderPretraining(encoder, num_classes, depth_weight, frozen_backbone, weights)
        trainer = Trainer(objective, objective, lambda idx: label_batch(dataset, idx), len(dataset), settings,
                          out_dir, info, stage="encoder")
        last = trainer.fit(resume=resume)
        objective.load_state_dict(trainer.averaged_model_state())
        if info.is_main:
            write_encoder_dir(out_dir, config, objective, dataset, settings, last, frozen_backbone)
        return last


def write_encoder_dir(out_dir: Path, config: ModelConfig, objective: EncoderPretraining, dataset: TrajectoryDataset,
                      settings: TrainSettings, last: Dict[str, float], frozen_backbone: bool) -> None:
    """Write ``image_encoder/``, ``heads.safetensors``, ``config.yaml`` and ``encoder.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = objective.cpu()
    objective.encoder.save_pretrained(out_dir / IMAGE_ENCODER_DIR)
    save_tensors(objective.heads, out_dir / HEADS_FILE)
    config.save_yaml(out_dir / CONFIG_FILE)
    summary = {
        "dataset": str(dataset.root), "samples": len(dataset), "classes": dataset.meta.segmentation_classes,
        "frozen_backbone": frozen_backbone, "depth_clip_m": DEPTH_CLIP_M,
        "class_weights": [float(w) for w in objective.class_weights],
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "betas"},
        "last": {k: float(v) for k, v in last.items()},
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    log.info("pretrained image encoder written to %s", out_dir / IMAGE_ENCODER_DIR)


def load_pretraining(directory: PathLike) -> EncoderPretraining:
    """The encoder and heads of a run written by :func:`train_encoder` (CPU, eval mode, frozen)."""
    directory = Path(directory)
    config = load_model_config(directory)
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    encoder = build_image_encoder(config, model_dir=directory)
    objective = EncoderPretraining(encoder, len(summary["classes"]), frozen_backbone=True)
    load_state_dict_into(objective.heads, read_safetensors(directory / HEADS_FILE), directory / HEADS_FILE,
                         "dense heads")
    return objective.requires_grad_(False).eval()


@torch.no_grad()
def evaluate_dense(directory: PathLike, data_dir: PathLike, max_samples: Optional[int] = None) -> Dict[str, float]:
    """Depth L1 (metres, pixels with geometry), segmentation pixel accuracy and mean IoU of a pretraining run on a
    labelled dataset (e.g. the held-out split)."""
    objective = load_pretraining(directory)
    dataset = TrajectoryDataset(data_dir)
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    classes = objective.heads.num_classes
    depth_error = depth_pixels = correct = pixels = 0.0
    intersection = np.zeros(classes)
    union = np.zeros(classes)
    for start in range(0, count, EVAL_BATCH):
        batch = label_batch(dataset, np.arange(start, min(start + EVAL_BATCH, count)))
        pred_depth, logits = objective.predict(batch["images"])
        rows, cols = pred_depth.shape[1:]
        target = batch["depth"][:, :rows, :cols].clamp(max=DEPTH_CLIP_M)
        labels = batch["segmentation"][:, :rows, :cols]
        valid = labels != 0
        depth_error += float(((pred_depth - target).abs() * valid).sum())
        depth_pixels += float(valid.sum())
        predicted = logits.argmax(1)
        correct += float((predicted == labels).sum())
        pixels += float(labels.numel())
        for c in range(classes):
            intersection[c] += float(((predicted == c) & (labels == c)).sum())
            union[c] += float(((predicted == c) | (labels == c)).sum())
    present = union > 0
    return {"samples": float(count), "depth_l1_m": depth_error / max(depth_pixels, 1.0),
            "segmentation_acc": correct / max(pixels, 1.0),
            "segmentation_miou": float((intersection[present] / union[present]).mean()) if present.any() else 0.0}
