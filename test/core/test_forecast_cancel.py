"""Cancelling a forecast between denoiser steps (issue 11, D9): the node's deactivate must not wait for a forecast."""

import threading

import numpy as np
import pytest
import torch

from traj_forecast_ros.errors import ForecastCancelled
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.flow import euler_sample
from traj_forecast_ros.model.presets import tiny_config


class CountingDenoiser(torch.nn.Module):
    """Zero velocity; counts its evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, t, frame_features, text_embeds=None):
        self.calls += 1
        return torch.zeros_like(x)


def test_euler_sample_stops_between_steps_when_cancelled():
    denoiser = CountingDenoiser()
    cond, noise = torch.zeros(1, 1, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    polls = []

    def cancel_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(ForecastCancelled, match="step 4 of 9"):
        euler_sample(denoiser, cond, noise, torch.zeros(1, 4, 8), steps=10, cancel=cancel_after_three)
    assert denoiser.calls == 3  # no evaluation after the flag was seen
    denoiser.calls = 0
    euler_sample(denoiser, cond, noise, torch.zeros(1, 4, 8), steps=10, cancel=lambda: False)
    assert denoiser.calls == 9


def test_forecast_is_identical_with_an_unset_cancel_event_and_stops_when_set():
    forecaster = Forecaster.from_config(tiny_config(text=False), device="cpu", dtype="float32")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    plain = forecaster.forecast(image, num_samples=3, steps=5, seed=7).tracks
    with_event = forecaster.forecast(image, num_samples=3, steps=5, seed=7, cancel=threading.Event()).tracks
    np.testing.assert_array_equal(plain, with_event)  # fp32 tracks unchanged when not cancelled
    stop = threading.Event()
    stop.set()
    with pytest.raises(ForecastCancelled):
        forecaster.forecast(image, num_samples=3, steps=5, seed=7, cancel=stop)
    np.testing.assert_array_equal(forecaster.forecast(image, num_samples=3, steps=5, seed=7).tracks, plain)
