"""What the trainers read: a dataset checked against the model, cached frozen-encoder features, normalised tracks.

A training *example* is one (scene, rollout) pair: a dataset of N scenes with R rollouts gives N * R examples that
share each scene's image features. DINOv2 features are computed once per dataset and encoder and cached as
``features-<key>.npy`` (key = hash of the encoder weights and input size) in ``<dataset>/.cache/`` when writable,
else in the run directory. :func:`prepare_examples` is the common start of every stage (dataset, encoder, features,
examples).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.geometry import normalise_points
from traj_forecast_ros.model.checkpoint import IMAGE_ENCODER_DIR
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder

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


def dataset_fingerprint(dataset: TrajectoryDataset) -> str:
    """Short hash of a dataset's ``index.json`` content (geometry, shard list, sizes, provenance)."""
    return hashlib.sha256(json.dumps(dataset.index, sort_keys=True).encode()).hexdigest()[:16]


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
                   device: torch.device = torch.device("cpu"), progress: bool = False,
                   fingerprint: Optional[str] = None) -> np.ndarray:
    """``[N, tokens, D]`` float32 frozen-encoder features of every dataset image (computed once, then cached).

    ``fingerprint``: the encoder's :func:`encoder_fingerprint` when already computed (the cache key).
    """
    key = fingerprint or encoder_fingerprint(encoder, dataset.meta.image_size)
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


OFFSCREEN_MARGIN = 1.0  # image sizes a true track may leave the image by and still be trained on and scored


def usable_samples(dataset: TrajectoryDataset, margin: float = OFFSCREEN_MARGIN) -> np.ndarray:
    """Indices of the samples whose true tracks all stay within ``margin`` image sizes of the image, in order.

    A point that passes close to a moving camera's plane (the wrist camera lowered next to the table) projects to
    pixels thousands of image sizes away: exact, but no position a forecast can be judged by, and a few such tracks
    would dominate every squared error and the VAE's latent statistics. Training and evaluation leave those samples
    out by this one rule (about 3 % of the simulated eye-in-hand clips, none of the agent-view ones).
    """
    height, width = dataset.meta.image_size
    low = np.array([-margin * width, -margin * height])
    high = np.array([(1 + margin) * width, (1 + margin) * height])
    keep = []
    for offset, shard in zip(np.cumsum([0, *dataset.shard_sizes[:-1]]), dataset.iter_shards()):
        tracks = np.asarray(shard.tracks)  # [n, R, T, Hq, Wq, 2]
        inside = ((tracks >= low) & (tracks <= high)).reshape(len(tracks), -1).all(axis=1)
        keep.append(offset + np.flatnonzero(inside))
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, np.int64)


class TrackExamples:
    """(scene, rollout) examples of a dataset's :func:`usable_samples` as normalised model inputs.

    ``tracks_norm(examples) -> [B, T, 2, Hq, Wq]`` (``2 p / size - 1``), ``features(examples) -> [B, N, D]``,
    ``batch(examples)`` (both, as the VAE and regressor objectives take them). ``features_key`` names the encoder the
    features came from (its :func:`encoder_fingerprint`; None when unknown).
    """

    def __init__(self, dataset: TrajectoryDataset, features: np.ndarray, config: ModelConfig,
                 features_key: Optional[str] = None) -> None:
        dataset.meta.check_model_geometry(config)
        self.dataset = dataset
        self.config = config
        self.features_all = features  # [len(dataset), N, D]: every sample's, used or not
        self.features_key = features_key
        self.num_rollouts = dataset.meta.num_rollouts
        self.scene_indices = usable_samples(dataset)  # the dataset samples the examples come from
        self.num_scenes = len(self.scene_indices)

    def __len__(self) -> int:
        return self.num_scenes * self.num_rollouts

    def scenes(self, examples: np.ndarray) -> np.ndarray:
        """Dataset index (scene) of each example (only :func:`usable_samples` have examples)."""
        return self.scene_indices[np.asarray(examples) // self.num_rollouts]

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

    def batch(self, examples: np.ndarray) -> Dict[str, torch.Tensor]:
        """``{"tracks_norm": [B, T, 2, Hq, Wq], "features": [B, N, D]}`` of the examples."""
        return {"tracks_norm": self.tracks_norm(examples), "features": self.features(examples)}


def build_image_encoder(config: ModelConfig, model_dir: Optional[Union[str, Path]] = None, seed: int = 0):
    """The frozen image encoder of ``config``: from ``model_dir``/hub, or random (deterministic in ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImageEncoder.from_config(config.image_encoder, model_dir=model_dir)


def build_text_encoder(config: ModelConfig, model_dir: Optional[Union[str, Path]] = None, seed: int = 0):
    """The frozen text encoder of ``config`` (None when it has none): from ``model_dir``/hub, or random (deterministic
    in ``seed``, so the encoder a run embeds with is the one it saves)."""
    if config.text_encoder is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextEncoder.from_config(config.text_encoder, model_dir=model_dir)


def prepare_examples(data_dir: Union[str, Path], config: ModelConfig, out_dir: Union[str, Path], info, settings,
                     encoder_dir: Optional[Union[str, Path]] = None, resume: bool = False,
                     encoder: Optional[torch.nn.Module] = None) -> Tuple[torch.nn.Module, TrackExamples]:
    """The common start of a training stage: ``(image encoder, examples)``.

    Opens the dataset (checked against ``config``). Without ``encoder``, builds the frozen image encoder (seeded with
    ``settings.seed``) from ``out_dir`` when resuming a run that saved one, else from ``encoder_dir`` when it is a
    directory, else randomly or from the hub per the config, and writes it to ``<out_dir>/image_encoder`` on rank 0
    before training (so a resumed run reuses it). Then the encoder's cached image features and the
    :class:`TrackExamples` over them. ``info`` is the run's :class:`~traj_forecast_ros.train.common.DistInfo`.
    """
    out_dir = Path(out_dir)
    dataset = TrajectoryDataset(data_dir)
    dataset.meta.check_model_geometry(config)
    if encoder is None:
        source = out_dir if resume and (out_dir / IMAGE_ENCODER_DIR).is_dir() else encoder_dir
        source = source if source is not None and Path(source).is_dir() else None
        encoder = build_image_encoder(config, model_dir=source, seed=settings.seed)
        if info.is_main:
            encoder.save_pretrained(out_dir / IMAGE_ENCODER_DIR)  # saved before training: resume reuses it
    fingerprint = encoder_fingerprint(encoder, dataset.meta.image_size)
    features = image_features(dataset, encoder, out_dir, info.device, progress=settings.progress and info.is_main,
                              fingerprint=fingerprint)
    return encoder, TrackExamples(dataset, features, config, features_key=fingerprint)
