"""Forecaster on tiny random models and the real shared frames: shapes, coordinates, determinism, caching, errors."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from traj_forecast_ros.errors import DeviceError, InvalidImageError, TrajForecastError
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.sampling_plan import resolve_device, resolve_dtype
from traj_forecast_ros.geometry import ImageTransform, query_grid
from traj_forecast_ros.model.checkpoint import save_model_dir
from traj_forecast_ros.model.presets import tiny_config

STAGES = {"preprocess", "image_encoder", "text_encoder", "vae_encode", "denoise", "vae_decode", "total"}


def _load(shared_images, name: str) -> np.ndarray:
    return np.asarray(Image.open(shared_images / name).convert("RGB"))


@pytest.fixture(scope="module")
def forecaster() -> Forecaster:
    return Forecaster.from_config(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def agent_image(shared_images) -> np.ndarray:
    return _load(shared_images, "libero_agent_0.jpg")


def test_forecast_shapes_and_metadata(forecaster, agent_image):
    result = forecaster.forecast(agent_image, instruction="open the drawer", num_samples=3, seed=5)
    cfg = forecaster.config
    assert result.tracks.shape == (3, cfg.num_frames, 8, 8, 2) and result.tracks.dtype == np.float32
    assert result.query_points.shape == (8, 8, 2) and result.query_points.dtype == np.float32
    assert result.image_size == (128, 128) and result.model_id == "tiny" and result.seed == 5
    assert result.device == "cpu" and result.dtype == "float32" and result.instruction == "open the drawer"
    assert set(result.timings) == STAGES and all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["denoise"]
    assert np.isfinite(result.tracks).all() and result.spread().mean() > 0  # samples differ from each other


@pytest.mark.parametrize("name, size", [("kubric_0.png", (256, 256)), ("physics101_0.jpg", (256, 464)),
                                        ("libero_gripper_3.jpg", (128, 128))])
def test_query_points_and_tracks_in_input_pixels(shared_images, name, size):
    """A decoder that outputs fixed normalised positions shows exactly where model pixels land in the input."""
    image = _load(shared_images, name)
    assert image.shape[:2] == size
    model = Forecaster.from_config(tiny_config(), seed=1)
    head = model.vae.final_layer.linear
    with torch.no_grad():  # every point decodes to (x, y) = (-0.5, 0.25) normalised -> model px (8, 20)
        head.weight.zero_()
        head.bias.copy_(torch.tensor([-0.5, 0.25]).repeat(head.bias.numel() // 2))
    result = model.forecast(image, instruction="push", num_samples=2, seed=0, anchor=False)  # the raw decoder output
    transform = ImageTransform.centre_crop(size, (32, 32))
    side = min(size)
    x0, y0 = (size[1] - side) // 2, (size[0] - side) // 2
    scale = side / 32
    np.testing.assert_allclose(result.tracks[..., 0], x0 + 8 * scale, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.tracks[..., 1], y0 + 20 * scale, rtol=0, atol=1e-4)
    expected_queries = transform.to_input(query_grid(model.config).astype(np.float64))
    np.testing.assert_allclose(result.query_points, expected_queries, atol=1e-4)
    # The query grid lies inside the centre crop, at offset + stride * index model pixels.
    xs, ys = result.query_points[..., 0], result.query_points[..., 1]
    assert xs.min() > x0 and xs.max() < x0 + side and ys.min() > y0 and ys.max() < y0 + side
    cfg = model.config
    assert xs[0, 0] == pytest.approx(x0 + cfg.query_offset * scale, abs=1e-3)
    assert ys[-1, 0] == pytest.approx(y0 + (cfg.query_offset + cfg.query_stride * 7) * scale, abs=1e-3)
    # Re-anchored (the default): no decoded displacement, so every frame is exactly the query grid.
    anchored = model.forecast(image, instruction="push", num_samples=2, seed=0)
    np.testing.assert_array_equal(anchored.tracks, np.broadcast_to(anchored.query_points, anchored.tracks.shape))


@pytest.mark.parametrize("name", ["physics101_0.jpg", "libero_agent_0.jpg"])
def test_frame_zero_is_exactly_the_query_points(forecaster, shared_images, name):
    """Every sampled trajectory starts exactly at its query point and keeps the decoder's displacements; the raw
    output (anchor=False) starts only near them. The summaries measure the anchored displacements."""
    image = _load(shared_images, name)
    result = forecaster.forecast(image, instruction="push", num_samples=3, steps=3, seed=2)
    raw = forecaster.forecast(image, instruction="push", num_samples=3, steps=3, seed=2, anchor=False)
    assert result.tracks.dtype == np.float32 and result.tracks.shape == raw.tracks.shape
    for sample in range(3):
        np.testing.assert_array_equal(result.tracks[sample, 0], result.query_points)
    np.testing.assert_array_equal(raw.query_points, result.query_points)
    assert np.abs(raw.tracks[:, 0] - raw.query_points).max() > 1e-3  # a random VAE misses the grid
    np.testing.assert_allclose(result.tracks - result.tracks[:, :1], raw.tracks - raw.tracks[:, :1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.mean_displacement(), (result.tracks[:, -1] - result.query_points).mean(0),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.mean_displacement(), raw.mean_displacement(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.displacement(), raw.displacement(), rtol=0, atol=1e-4)


def test_anchor_to_query_points_on_hand_made_tracks():
    from traj_forecast_ros.forecast import anchor_to_query_points

    query = np.array([[[0.5, 0.5], [10.25, 3.0]]], np.float32)  # [1, 2, 2]
    tracks = np.zeros((2, 3, 1, 2, 2), np.float32)  # K=2, T=3
    tracks[0] = [[[[1.0, 1.0], [11.0, 2.0]]], [[[2.0, 1.0], [11.0, 4.0]]], [[[4.0, 1.0], [11.0, 6.0]]]]
    tracks[1] = tracks[0] - 0.75
    anchored = anchor_to_query_points(tracks, query)
    assert anchored.dtype == np.float32
    np.testing.assert_array_equal(anchored[:, 0], np.broadcast_to(query, (2, 1, 2, 2)))
    np.testing.assert_array_equal(anchored[0, 2], [[[3.5, 0.5], [10.25, 7.0]]])  # displacement (3, 0) and (0, 4)
    np.testing.assert_array_equal(anchored[1], anchored[0])  # a shifted copy lands on the same anchored tracks


def test_colour_orders_give_the_same_forecast(forecaster, shared_images):
    rgb = _load(shared_images, "kubric_0.png")
    reference = forecaster.forecast(rgb, instruction="go", num_samples=1, seed=3).tracks
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    variants = [
        (np.ascontiguousarray(rgb[..., ::-1]), "bgr"),
        (np.concatenate([rgb, alpha], axis=-1), None),
        (np.concatenate([rgb[..., ::-1], alpha], axis=-1), "bgra"),
    ]
    for image, order in variants:
        tracks = forecaster.forecast(image, instruction="go", num_samples=1, seed=3, color_order=order).tracks
        np.testing.assert_array_equal(tracks, reference)
    gray = rgb.mean(-1).astype(np.uint8)
    mono = forecaster.forecast(gray, instruction="go", num_samples=1, seed=3).tracks
    as_rgb = forecaster.forecast(np.repeat(gray[..., None], 3, -1), instruction="go", num_samples=1, seed=3).tracks
    np.testing.assert_array_equal(mono, as_rgb)


def test_seed_determinism(forecaster, agent_image):
    first = forecaster.forecast(agent_image, "put the bowl on the plate", num_samples=2, seed=11).tracks
    again = forecaster.forecast(agent_image, "put the bowl on the plate", num_samples=2, seed=11).tracks
    other = forecaster.forecast(agent_image, "put the bowl on the plate", num_samples=2, seed=12).tracks
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    fresh = forecaster.forecast(agent_image, "put the bowl on the plate", num_samples=2)
    assert fresh.seed is not None
    replay = forecaster.forecast(agent_image, "put the bowl on the plate", num_samples=2, seed=fresh.seed).tracks
    np.testing.assert_array_equal(fresh.tracks, replay)


def test_initial_noise_is_honoured(forecaster, agent_image):
    T, C, h, w = forecaster.latent_shape
    noise = torch.randn(2, T - 1, C, h, w, generator=torch.Generator().manual_seed(0))
    a = forecaster.forecast(agent_image, "stack", num_samples=2, seed=1, initial_noise=noise)
    b = forecaster.forecast(agent_image, "stack", num_samples=2, seed=99, initial_noise=noise.numpy())
    np.testing.assert_array_equal(a.tracks, b.tracks)
    assert a.seed is None
    full = torch.randn(2, T, C, h, w, generator=torch.Generator().manual_seed(0))
    c = forecaster.forecast(agent_image, "stack", num_samples=2, initial_noise=full)
    d = forecaster.forecast(agent_image, "stack", num_samples=2, initial_noise=full)
    np.testing.assert_array_equal(c.tracks, d.tracks)
    assert np.abs(c.tracks - a.tracks).max() > 1e-4  # different noise -> different tracks
    # A seeded forecast draws from torch.Generator().manual_seed(seed): first the flow noise of frames 1..T-1
    # (the official sampler's draw), then the conditioning eps (frame 0).
    seeded = forecaster.forecast(agent_image, "stack", num_samples=2, seed=4)
    generator = torch.Generator().manual_seed(4)
    flow = torch.randn(2, T - 1, C, h, w, generator=generator)
    drawn = torch.cat([torch.randn(2, 1, C, h, w, generator=generator), flow], dim=1)
    np.testing.assert_array_equal(forecaster.forecast(agent_image, "stack", num_samples=2, initial_noise=drawn).tracks,
                                  seeded.tracks)
    with pytest.raises(ValueError, match="initial_noise must be"):
        forecaster.forecast(agent_image, "stack", num_samples=3, initial_noise=noise)


def test_chunked_sampling_matches_one_batch(agent_image):
    model = Forecaster.from_config(tiny_config(), seed=2)
    assert model.sample_batch_size >= 3  # CPU, small model: all K in one call (the plan's size rule)
    together = model.forecast(agent_image, "lift", num_samples=3, seed=8).tracks
    model.sample_batch_size = 1
    one_by_one = model.forecast(agent_image, "lift", num_samples=3, seed=8).tracks
    np.testing.assert_allclose(one_by_one, together, rtol=0, atol=1e-3)


def test_text_embedding_cache(agent_image, caplog):
    model = Forecaster.from_config(tiny_config(), seed=0)
    calls = []
    original = model.text_encoder.forward
    model.text_encoder.forward = lambda texts: calls.append(list(texts)) or original(texts)
    model.forecast(agent_image, "open the microwave", num_samples=1, seed=0)
    model.forecast(agent_image, "open the microwave", num_samples=1, seed=1)
    model.forecast(agent_image, "close the microwave", num_samples=1, seed=0)
    assert calls == [["open the microwave"], ["close the microwave"]]
    assert model.text_cache.hits == 1 and model.text_cache.misses == 2 and len(model.text_cache) == 2
    with caplog.at_level(logging.INFO, logger="traj_forecast_ros.conditioning"):
        result = model.forecast(agent_image, None, num_samples=1, seed=0)
    assert result.instruction == model.config.default_instruction and "default" in caplog.text
    model.text_cache.capacity = 2
    model.forecast(agent_image, "third", num_samples=1, seed=0)
    assert len(model.text_cache) == 2 and "open the microwave" not in model.text_cache


@pytest.mark.parametrize(
    "image, reason",
    [(np.zeros((0, 10, 3), np.uint8), "empty"), (np.zeros((10, 10, 3), np.float32), "uint8"),
     (np.full((10, 10, 3), np.nan), "NaN"), (np.zeros((10, 10, 5), np.uint8), "channels"),
     (np.zeros((2, 10, 10, 3), np.uint8), "dims")],
)
def test_bad_images_raise_invalid_image_error(forecaster, image, reason):
    with pytest.raises(InvalidImageError, match=reason):
        forecaster.forecast(image, "x", num_samples=1, seed=0)


def test_bad_arguments_and_too_large_images(forecaster, agent_image):
    with pytest.raises(ValueError, match="num_samples"):
        forecaster.forecast(agent_image, "x", num_samples=0)
    with pytest.raises(ValueError, match="steps"):
        forecaster.forecast(agent_image, "x", steps=1)
    with pytest.raises(InvalidImageError, match="max_pixels"):
        forecaster.forecast(agent_image, "x", num_samples=1, max_pixels=1000)


def test_device_and_dtype_policy(agent_image):
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            Forecaster.from_config(tiny_config(), device="cuda")
    bf16 = Forecaster.from_config(tiny_config(), dtype="bfloat16", seed=0)
    fp32 = Forecaster.from_config(tiny_config(), seed=0)
    low = bf16.forecast(agent_image, "grab", num_samples=1, seed=0)
    high = fp32.forecast(agent_image, "grab", num_samples=1, seed=0)
    assert low.dtype == "bfloat16" and bf16.dtype == torch.bfloat16
    assert next(bf16.denoiser.parameters()).dtype == torch.float32  # parameters stay float32
    assert np.abs(low.tracks - high.tracks).mean() < 1.0  # same noise, only rounding differs (pixels)


def test_non_finite_output_is_an_error(agent_image):
    model = Forecaster.from_config(tiny_config(), seed=0)
    with torch.no_grad():
        model.vae.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(TrajForecastError, match="NaN"):
        model.forecast(agent_image, "x", num_samples=1, seed=0)


def test_model_without_language_conditioning(agent_image):
    model = Forecaster.from_config(tiny_config(text=False), seed=0)
    result = model.forecast(agent_image, num_samples=2, seed=0)
    assert result.instruction is None and result.timings["text_encoder"] < 0.01
    with pytest.raises(ValueError, match="no language conditioning"):
        model.forecast(agent_image, "open the drawer", num_samples=1)


def test_raw_model_end_to_end(agent_image):
    cfg = tiny_config(text=False)
    cfg.vae = None
    cfg.latent_scale = None
    cfg.denoiser = dataclasses.replace(cfg.denoiser, input_size=8, patch_size=2, in_channels=2, latent=False,
                                       pos_embed_dim=16)
    model = Forecaster.from_config(cfg, seed=0)
    assert model.latent_shape == (4, 2, 8, 8)
    result = model.forecast(agent_image, num_samples=2, seed=0)
    assert result.tracks.shape == (2, 4, 8, 8, 2)
    # Raw models pin frame 0 to the query grid itself.
    np.testing.assert_allclose(result.tracks[:, 0], np.broadcast_to(result.query_points, (2, 8, 8, 2)), atol=1e-4)


def test_from_pretrained_model_dir_reproduces_from_config(tmp_path, agent_image):
    model = Forecaster.from_config(tiny_config(), seed=3)
    save_model_dir(tmp_path / "tiny", model.config, model.denoiser, model.vae, model.image_encoder,
                   model.text_encoder)
    loaded = Forecaster.from_pretrained(tmp_path / "tiny", device="cpu", plan_probe=False)  # from_config's plan
    assert loaded.model_id == "tiny" and loaded.dtype == torch.float32 and loaded.plan == model.plan
    np.testing.assert_array_equal(loaded.forecast(agent_image, "wipe", num_samples=2, seed=6).tracks,
                                  model.forecast(agent_image, "wipe", num_samples=2, seed=6).tracks)


def test_warmup_and_release(agent_image):
    model = Forecaster.from_config(tiny_config(), seed=0)
    timings = model.warmup()
    assert set(timings) == STAGES
    model.release()
    assert model.denoiser is None and len(model.text_cache) == 0
    with pytest.raises(TrajForecastError, match="released"):
        model.forecast(agent_image, "x", num_samples=1)


@pytest.mark.parametrize("bad", [False, True, -1, 0.0, 2.5, "4"])
def test_invalid_sample_batch_size_is_refused(bad):
    with pytest.raises(ValueError, match="sample_batch_size"):
        Forecaster.from_config(tiny_config(), sample_batch_size=bad)


def test_out_of_memory_propagates_and_forecaster_stays_usable(agent_image, monkeypatch):
    model = Forecaster.from_config(tiny_config(), seed=0)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model.sampler, "run", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        model.forecast(agent_image, "x", num_samples=1)
    assert emptied == []  # a CPU forecaster has no CUDA cache to empty
    monkeypatch.setattr(model.runtime, "device", torch.device("cuda"))  # only the cleanup branch looks at the device
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        model.forecast(agent_image, "x", num_samples=1)
    assert emptied == [True]
    monkeypatch.undo()
    assert model.forecast(agent_image, "x", num_samples=1, steps=2, seed=0).tracks.shape[0] == 1


@pytest.mark.parametrize("preset", ["demo-blocks", "tiny-blocks", "sim-manipulation", "tiny-sim"])
def test_from_config_runs_presets_without_a_measured_latent_scale(preset):
    """Presets whose latent scale is measured in training (None) still give a usable random-weight forecaster
    (unit scale); a loaded model without one is refused with a clear error instead of a TypeError."""
    from traj_forecast_ros.errors import CheckpointError
    from traj_forecast_ros.model.presets import preset_config

    config = preset_config(preset)
    assert config.vae is not None and config.latent_scale is None
    model = Forecaster.from_config(config, seed=0)
    assert model.config.latent_scale == [1.0] * model.denoiser.in_channels
    assert config.latent_scale is None  # the caller's config is not changed
    height, width = config.image_size
    instruction = "push the red cube" if model.text_encoder is not None else None
    result = model.forecast(np.zeros((height, width, 3), np.uint8), instruction, num_samples=1, steps=2, seed=0)
    assert np.isfinite(result.tracks).all()
    with pytest.raises(CheckpointError, match="latent_scale"):
        Forecaster(config, model.denoiser, model.vae, model.image_encoder, model.text_encoder, preset)


def test_stage_timings_wait_for_the_forecasters_own_stream_only(forecaster, monkeypatch):
    """runtime.timed synchronises this forecaster's stream, not the whole device (other forecasters keep running)."""
    waits = []

    class Stream:
        def synchronize(self):
            waits.append("own stream")

    def device_wide(*args, **kwargs):
        raise AssertionError("device-wide synchronize")

    monkeypatch.setattr(torch.cuda, "synchronize", device_wide)
    monkeypatch.setattr(forecaster.runtime, "stream", Stream())
    timings = {}
    with forecaster.runtime.timed(timings, "stage"):
        pass
    assert waits == ["own stream"] and timings["stage"] >= 0.0
