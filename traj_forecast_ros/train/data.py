"""What the trainers read: a dataset checked against the model, cached frozen-encoder features, normalised tracks.

A training *example* is one (scene, rollout) pair: a dataset of N scenes with R rollouts gives N * R examples that
share each scene's image features. DINOv2 features are computed once per dataset and encoder and cached as
``features-<key>.npy`` (key = hash of the encoder weights and input size) in ``<dataset>/.cache/`` when writable,
else in the run directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.geometry import normalise_points
from traj_forecast_ros.model.config import ModelConfig

log = logging.getLogger(__name__)

FEATURE_BATCH = 64


def encoder_fingerprint(encoder: torch.nn.Module, image_size) -> str:
    """Short hash of an encoder's weights, preprocessing flags and input size (the feature cache key)."""
    digest = hashlib.sha256()
    flags = (tuple(image_size), getattr(encoder, "resize", None), getattr(encoder, "drop_cls", None))
    digest.update(repr(flags).encode())
    for key, value in sorted(encoder.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _writable_dir(preferred: Path, fallback: Path) -> Path:
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        probe = preferred / ".write-test"
        probe.write_text("")
        probe.unlink()
        return preferred
    except OSError:
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def image_features(dataset: TrajectoryDataset, encoder: torch.nn.Module, fallback_dir: Path,
                   device: torch.device = torch.device("cpu"), progress: bool = False) -> np.ndarray:
    """``[N, tokens, D]`` float32 frozen-encoder features of every dataset image (computed once, then cached)."""
    key = encoder_fingerprint(encoder, dataset.meta.image_size)
    cache_dir = _writable_dir(dataset.root / ".cache", Path(fallback_dir) / "cache")
    path = cache_dir / f"features-{key}.npy"
    if path.is_file():
        features = np.load(path, mmap_mode="r")
        if features.shape[0] == len(dataset):
            return np.asarray(features)
        log.warning("%s holds %d rows for %d images: recomputing", path, features.shape[0], len(dataset))
    encoder = encoder.to(device).eval()
    chunks = []
    shards = dataset.iter_shards()
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, total=len(dataset.shard_names), desc="image features", unit="shard")
    with torch.inference_mode():
        for shard in shards:
            for start in range(0, len(shard), FEATURE_BATCH):
                images = torch.from_numpy(np.array(shard.images[start:start + FEATURE_BATCH]))  # [b, H, W, 3]
                chunks.append(encoder(images.to(device)).float().cpu().numpy())  # [b, N, D]
    features = np.concatenate(chunks).astype(np.float32)
    partial = path.with_name(path.name + f".{os.getpid()}.partial.npy")
    np.save(partial, features)
    os.replace(partial, path)
    return features


class TrackExamples:
    """(scene, rollout) examples of a dataset as normalised model inputs.

    ``tracks_norm(examples) -> [B, T, 2, Hq, Wq]`` (``2 p / size - 1``), ``features(examples) -> [B, N, D]``.
    """

    def __init__(self, dataset: TrajectoryDataset, features: np.ndarray, config: ModelConfig) -> None:
        dataset.meta.check_model_geometry(config)
        self.dataset = dataset
        self.config = config
        self.features_all = features
        self.num_rollouts = dataset.meta.num_rollouts
        self.num_scenes = len(dataset)

    def __len__(self) -> int:
        return self.num_scenes * self.num_rollouts

    def scenes(self, examples: np.ndarray) -> np.ndarray:
        """Scene index of each example."""
        return np.asarray(examples) // self.num_rollouts

    def features(self, examples: np.ndarray) -> torch.Tensor:
        """``[B, N, D]`` image features of the examples' scenes."""
        return torch.from_numpy(np.ascontiguousarray(self.features_all[self.scenes(examples)]))

    def tracks_pixels(self, examples: np.ndarray) -> np.ndarray:
        """``[B, T, Hq, Wq, 2]`` ground-truth tracks in pixels."""
        examples = np.asarray(examples)
        tracks = self.dataset.gather("tracks", self.scenes(examples))  # [B, R, T, Hq, Wq, 2]
        return tracks[np.arange(len(examples)), examples % self.num_rollouts]

    def tracks_norm(self, examples: np.ndarray) -> torch.Tensor:
        """``[B, T, 2, Hq, Wq]`` normalised tracks (channels x, y)."""
        pixels = torch.from_numpy(self.tracks_pixels(examples).astype(np.float32))
        return normalise_points(pixels, tuple(self.config.image_size)).permute(0, 1, 4, 2, 3).contiguous()


def build_image_encoder(config: ModelConfig, model_dir: Optional[Union[str, Path]] = None, seed: int = 0):
    """The frozen image encoder of ``config``: from ``model_dir``/hub, or random (deterministic in ``seed``)."""
    from traj_forecast_ros.model.encoders import ImageEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImageEncoder.from_config(config.image_encoder, model_dir=model_dir)
