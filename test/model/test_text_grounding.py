"""Where the instruction points in the image (``DenoiserConfig.text_grounding``): what the map adds to the
denoiser, that it is spatial, that guidance rows see it, and that a trained denoiser gains it with its outputs
unchanged; and, for both instruction paths (this and ``text_context``), the CPU kernels and the forecaster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.checkpoint import load_model_dir, save_model_dir
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.kernels import FastCPUOps
from traj_forecast_ros.model.presets import tiny_config
from traj_forecast_ros.model.vae import TrajectoryVAE
from traj_forecast_ros.train.flow import with_text_paths


def _grounded_config() -> ModelConfig:
    config = tiny_config()
    config.denoiser.text_grounding = True
    return config


def test_the_grounding_map_carries_the_instruction(randomize, text_inputs, silence_pooled_text):
    assert tiny_config().denoiser.text_grounding is False and ModelConfig().denoiser.text_grounding is False
    plain = silence_pooled_text(randomize(LatteDenoiser(tiny_config().denoiser), std=0.2).eval())
    grounded = silence_pooled_text(randomize(LatteDenoiser(_grounded_config().denoiser), std=0.2).eval())
    x, t, features, text = text_inputs(grounded)
    same_x = x[:1].expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        ignored, read = plain(same_x, t, features, text), grounded(same_x, t, features, text)
    torch.testing.assert_close(ignored[0], ignored[1])  # nothing else reads the instruction here
    assert (read[0] - read[1]).abs().mean() > 1e-3 * read.abs().mean()
    with torch.no_grad():  # one image row shared by two text rows (guidance) = each row on its own
        rows = torch.cat([grounded(same_x[:1], t[:1], features, text[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(read, rows, rtol=1e-4, atol=1e-5)


def test_the_map_of_a_latent_token_reads_the_image_tokens_under_it(randomize, text_inputs):
    """Changing the image tokens of one corner changes the map of the latent token over that corner only."""
    model = randomize(LatteDenoiser(_grounded_config().denoiser), std=0.2).eval()
    grounding = model.text_grounding
    _, _, features, text = text_inputs(model, texts=1)
    (rows, cols), (token_rows, token_cols) = model.frame_token_grid, model.token_grid
    assert rows % token_rows == 0 and cols % token_cols == 0 and model.num_tokens > 1
    changed = features.clone().view(1, rows, cols, -1)
    corner = changed[:, :rows // token_rows, :cols // token_cols]  # the image tokens under latent token 0
    corner += torch.randn(corner.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = grounding(features, text), grounding(changed.view_as(features), text)
    assert before.shape == (1, model.num_tokens, model.cfg.hidden_size)
    moved = (after - before).abs().amax(dim=-1)[0]  # (L,)
    assert moved[0] > 1e-3 and torch.all(moved[1:] == 0)


@pytest.mark.parametrize("path", ["text_context", "text_grounding"])
def test_cpu_kernels_match_the_reference_with_either_instruction_path(randomize, text_inputs, path):
    config = tiny_config()
    setattr(config.denoiser, path, True)
    model = randomize(LatteDenoiser(config.denoiser), std=0.05).eval()
    x, t, features, text = text_inputs(model, texts=3)
    with torch.inference_mode():
        plain = model(x, t, features, text)
        fast = model(x, t, features, text, ops=FastCPUOps())
    assert plain.abs().max() > 0.1
    assert ((fast - plain).norm() / plain.norm()).item() < 1e-5


def test_a_trained_denoiser_gains_the_map_with_its_outputs_unchanged_and_learns_it(tmp_path, randomize, text_inputs):
    config = tiny_config()
    trained = randomize(LatteDenoiser(config.denoiser), std=0.05).eval()
    extended = with_text_paths(config, trained, seed=0, text_grounding=True).eval()
    assert config.denoiser.text_grounding is True and config.denoiser.text_context is False
    kept = extended.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in trained.state_dict().items())
    assert {k.split(".")[0] for k in kept if k not in trained.state_dict()} == {"text_grounding"}
    x, t, features, text = text_inputs(extended)
    with torch.no_grad():
        before = trained(x, t, features, text)
    torch.testing.assert_close(extended(x, t, features, text).detach(), before, rtol=0, atol=0)  # zero start
    extended(x, t, features, text).square().mean().backward()  # ... that training moves
    assert extended.text_grounding.out_proj.weight.grad.abs().sum() > 0

    save_model_dir(tmp_path / "m", config, extended, TrajectoryVAE(config.vae).eval())
    assert "text_grounding: true" in (tmp_path / "m" / "config.yaml").read_text()
    loaded_config, loaded, _ = load_model_dir(tmp_path / "m")
    assert loaded_config.denoiser.text_grounding is True
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in kept.items())
    assert with_text_paths(loaded_config, loaded, seed=0, text_grounding=True) is loaded  # nothing left to add


@pytest.mark.parametrize("path", ["text_context", "text_grounding"])
def test_the_forecaster_runs_either_instruction_path(path):
    config = tiny_config()
    setattr(config.denoiser, path, True)
    model = Forecaster.from_config(config, seed=0)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    first = model.forecast(image, "pick up the cube", num_samples=2, steps=3, seed=1)
    again = model.forecast(image, "pick up the cube", num_samples=2, steps=3, seed=1)
    other = model.forecast(image, "push the cube", num_samples=2, steps=3, seed=1)
    assert np.array_equal(first.tracks, again.tracks) and np.isfinite(other.tracks).all()
    np.testing.assert_array_equal(first.tracks[:, 0], other.tracks[:, 0])  # frame 0 at the query points
