"""Tiny synthetic dataset and stage-1 run shared by the training tests (tiny-blocks geometry: 8x8 grid, T = 4)."""

from pathlib import Path

import pytest

from traj_forecast_ros.data.synthetic import GeneratorConfig, write_dataset
from traj_forecast_ros.train.common import TrainSettings
from traj_forecast_ros.train.presets import tiny_blocks_config


def tiny_generator(rollouts: int = 2) -> GeneratorConfig:
    config = tiny_blocks_config()
    return GeneratorConfig(num_frames=config.num_frames, query_grid=config.query_grid,
                           query_stride=config.query_stride, query_offset=config.query_offset, rollouts=rollouts)


def settings(**overrides) -> TrainSettings:
    values = dict(steps=6, batch_size=4, lr=2e-3, warmup_steps=0, log_every=1, checkpoint_every=100, seed=0,
                  device="cpu", progress=False)
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture
def make_settings():
    """``make_settings(**overrides) -> TrainSettings`` for a few quiet CPU steps."""
    return settings


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 scenes x 2 rollouts, kinds cycled so every kind (incl. resting scenes) appears."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    write_dataset(root, 12, seed=3, config=tiny_generator(),
                  kinds=["fall", "stack", "topple", "ramp", "slide", "rest"])
    return root


@pytest.fixture(scope="session")
def tiny_vae_run(tiny_data, tmp_path_factory) -> Path:
    """A stage-1 run directory (briefly trained VAE + encoder + latent scale)."""
    from traj_forecast_ros.train.vae import train_vae

    out = tmp_path_factory.mktemp("runs") / "vae"
    train_vae(tiny_data, out, tiny_blocks_config(), settings(steps=8))
    return out
