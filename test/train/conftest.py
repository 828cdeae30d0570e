"""Tiny synthetic dataset and stage-1 run shared by the training tests (tiny-blocks geometry: 8x8 grid, T = 4)."""

import csv
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from traj_forecast_ros.data.scenes import GeneratorConfig
from traj_forecast_ros.data.synthetic import write_dataset
from traj_forecast_ros.train.common import TrainSettings
from traj_forecast_ros.model.presets import tiny_blocks_config


def tiny_generator(rollouts: int = 2) -> GeneratorConfig:
    config = tiny_blocks_config()
    return GeneratorConfig(num_frames=config.num_frames, query_grid=config.query_grid,
                           query_stride=config.query_stride, query_offset=config.query_offset, rollouts=rollouts)


def settings(**overrides) -> TrainSettings:
    values = dict(steps=6, batch_size=4, lr=2e-3, warmup_steps=0, log_every=1, checkpoint_every=100, seed=0,
                  device="cpu", progress=False)
    values.update(overrides)
    return TrainSettings(**values)


def metrics_rows(path: Path) -> List[Dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as dicts of floats (empty cells left out)."""
    with Path(path).open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


@pytest.fixture
def read_metrics() -> Callable[[Path], List[Dict[str, float]]]:
    """``read_metrics(path)``: the rows of a ``metrics.csv`` written by :class:`MetricsLogger`."""
    return metrics_rows


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
