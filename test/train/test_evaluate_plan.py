"""`traj-forecast evaluate --sample-batch-size`: 'auto' (default) keeps the sampling plan chosen at load."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest

from traj_forecast_ros.commands import evaluate as evaluate_command
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.presets import tiny_config
from traj_forecast_ros.train.evaluate import forecaster_predictions


class FakeDataset:
    """Two scenes of the tiny model's image size (only what forecaster_predictions reads)."""

    def __init__(self, size):
        self.meta = SimpleNamespace(check_model_geometry=lambda config: None)
        self.images = np.random.default_rng(0).integers(0, 255, size=(2, *size, 3), dtype=np.uint8)

    def gather(self, field, indices):
        assert field == "images"
        return self.images[list(indices)]


@pytest.fixture
def loaded(monkeypatch):
    """from_pretrained returns a tiny random-weight forecaster; the test sees which one."""
    built = []

    def from_pretrained(model, device="auto", dtype="auto", **kwargs):
        built.append(Forecaster.from_config(tiny_config(text=False), seed=0))
        return built[-1]

    monkeypatch.setattr(Forecaster, "from_pretrained", staticmethod(from_pretrained))
    return built


def test_default_keeps_the_plan_chosen_at_load(loaded):
    dataset = FakeDataset(tuple(tiny_config().image_size))
    pred = forecaster_predictions("tiny", dataset, [0, 1], num_samples=3, steps=2)
    assert pred.shape[:2] == (2, 3)
    plan = loaded[-1].plan
    assert plan.chosen_by == "size rule" and plan.sample_batch_size >= 3  # untouched

    forecaster_predictions("tiny", dataset, [0], num_samples=3, steps=2, sample_batch_size=1)
    assert loaded[-1].plan.chosen_by == "given" and loaded[-1].sample_batch_size == 1
    forecaster_predictions("tiny", dataset, [0], num_samples=3, steps=2, sample_batch_size=0)
    assert loaded[-1].plan.chosen_by == "given" and loaded[-1].sample_batch_size is None  # all K at once


def test_cli_flag_defaults_to_auto_and_parses_numbers():
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--data", "d"])
    assert args.sample_batch_size == "auto"
    assert parser.parse_args(["evaluate", "--data", "d", "--sample-batch-size", "4"]).sample_batch_size == 4
    assert parser.parse_args(["evaluate", "--data", "d", "--sample-batch-size", "AUTO"]).sample_batch_size == "auto"
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["evaluate", "--data", "d", "--sample-batch-size", bad])
