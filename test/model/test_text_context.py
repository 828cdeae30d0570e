"""The instruction as a cross-attention context token (``DenoiserConfig.text_context``): what it adds to the
denoiser, that guidance rows see it, and that a trained denoiser gains it unchanged otherwise (the CPU kernels and
the forecaster with it: ``test_text_grounding.py``, for both instruction paths)."""

from __future__ import annotations

import torch

from traj_forecast_ros.model.checkpoint import load_model_dir, save_model_dir
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.presets import tiny_config
from traj_forecast_ros.model.vae import TrajectoryVAE
from traj_forecast_ros.train.flow import with_text_paths


def test_the_context_token_carries_the_instruction_to_every_token(randomize, text_inputs, silence_pooled_text):
    config = tiny_config()
    assert config.denoiser.text_context is False and ModelConfig().denoiser.text_context is False  # LIBERO: off
    plain = silence_pooled_text(randomize(LatteDenoiser(config.denoiser), std=0.2).eval())
    config.denoiser.text_context = True
    reading = silence_pooled_text(randomize(LatteDenoiser(config.denoiser), std=0.2).eval())
    x, t, features, text = text_inputs(reading)
    same_x = x[:1].expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        ignored, read = plain(same_x, t, features, text), reading(same_x, t, features, text)
    torch.testing.assert_close(ignored[0], ignored[1])  # without the token nothing reads the instruction here
    assert (read[0] - read[1]).abs().mean() > 1e-3 * read.abs().mean()  # with it, the two instructions differ
    with torch.no_grad():  # one image row shared by two text rows (guidance) = each row on its own
        rows = torch.cat([reading(same_x[:1], t[:1], features, text[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(read, rows, rtol=1e-4, atol=1e-5)


def test_a_trained_denoiser_gains_the_token_and_keeps_every_weight(tmp_path, randomize, text_inputs):
    config = tiny_config()
    trained = randomize(LatteDenoiser(config.denoiser), std=0.05).eval()
    extended = with_text_paths(config, trained, seed=0, text_context=True).eval()
    assert config.denoiser.text_context is True
    kept = extended.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in trained.state_dict().items())
    assert {k for k in kept if k not in trained.state_dict()} == {
        "text_context_proj.0.weight", "text_context_proj.0.bias", "text_context_proj.1.weight",
        "text_context_proj.1.bias"}
    x, t, features, text = text_inputs(trained)
    with torch.no_grad():
        before, after = trained(x, t, features, text), extended(x, t, features, text)
    assert 0 < ((after - before).norm() / before.norm()).item() < 0.2  # a small start, not a new model

    vae = TrajectoryVAE(config.vae).eval()
    save_model_dir(tmp_path / "m", config, extended, vae)
    assert "text_context: true" in (tmp_path / "m" / "config.yaml").read_text()
    loaded_config, loaded, _ = load_model_dir(tmp_path / "m")
    assert loaded_config.denoiser.text_context is True
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in kept.items())
