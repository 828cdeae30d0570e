"""The raw forecast (``anchor=False``) against the official sampling pipeline written out with the official-style
module forwards of ``bench/bench_model_modules.py``; the default forecast is that output re-anchored."""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from traj_forecast_ros.forecast import anchor_to_query_points
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.geometry import denormalise_points, prepare_image
from traj_forecast_ros.model.flow import grid_to_latents, latents_to_grid
from traj_forecast_ros.model.presets import tiny_config


def official_forecast(reference, forecaster: Forecaster, image: np.ndarray, instruction: str, num_samples: int,
                      steps: int, seed: int) -> np.ndarray:
    """``[K, T, Hq, Wq, 2]`` input pixels: encode the static grid, draw the conditioning latent, Euler-integrate the
    official denoiser forward from the same noise, decode, map back to the input image."""
    model_image, transform = prepare_image(image, tuple(forecaster.config.image_size))
    vae, scale = forecaster.vae, forecaster.conditioner.latent_scale
    with torch.inference_mode():
        features = forecaster.encode_image(model_image)  # [1, N, D]
        text = forecaster.embed_instruction(instruction).expand(num_samples, -1)
        noise = forecaster.sampler.draw_noise(num_samples, seed)  # [K, T, C, h, w]: frame 0 = eps of the conditioning draw
        mean, std = reference.official_vae_encode(vae, forecaster.conditioner.static_tracks, features)  # [1, T, L, Z]
        cond = (latents_to_grid(mean[:, :1], vae.latent_grid) * scale
                + latents_to_grid(std[:, :1], vae.latent_grid) * scale * noise[:, :1])  # [K, 1, C, h, w]
        state = torch.cat([cond, noise[:, 1:]], dim=1)
        times = torch.linspace(0.0, 1.0, steps)
        batch_features = features.expand(num_samples, -1, -1)
        for k in range(steps - 1):
            state[:, :1] = cond
            velocity = reference.official_denoiser_forward(forecaster.denoiser, state, times[k].expand(num_samples),
                                                           batch_features, text)
            state[:, 1:] += (times[k + 1] - times[k]) * velocity[:, 1:]
        state[:, :1] = cond
        decoded = reference.official_vae_decode(vae, grid_to_latents(state / scale), batch_features)
    pixels = denormalise_points(rearrange(decoded, "k t c h w -> k t h w c"), tuple(forecaster.config.image_size))
    return transform.to_input(pixels.numpy().astype(np.float64))


def test_raw_forecast_is_the_official_pipeline_and_the_default_re_anchors_it(reference, shared_images) -> None:
    forecaster = Forecaster.from_config(tiny_config(), seed=0)
    assert forecaster.config.latent_draw == "sample"  # the official conditioning draw, mean + std * eps
    image = np.asarray(Image.open(shared_images / "physics101_0.jpg").convert("RGB"))  # 256 x 464: crop + resize
    expected = official_forecast(reference, forecaster, image, "push the cart", num_samples=3, steps=4, seed=5)
    raw = forecaster.forecast(image, "push the cart", num_samples=3, steps=4, seed=5, anchor=False)
    assert np.abs(expected[:, -1] - expected[:, 0]).max() > 1.0  # the tracks move: the comparison means something
    np.testing.assert_allclose(raw.tracks, expected, rtol=0, atol=1e-4)
    anchored = forecaster.forecast(image, "push the cart", num_samples=3, steps=4, seed=5)
    np.testing.assert_allclose(anchored.tracks, anchor_to_query_points(expected, anchored.query_points), rtol=0,
                               atol=1e-4)
    np.testing.assert_array_equal(anchored.tracks[:, 0], np.broadcast_to(anchored.query_points, (3, 8, 8, 2)))
