"""Each training stage lowers its loss on tiny data; resume is exact; outputs load as models; fine-tuning starts from
the given weights (our model directories and official .pth checkpoints)."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.data.scenes import GeneratorConfig
from traj_forecast_ros.data.synthetic import write_dataset
from traj_forecast_ros.errors import DatasetError
from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.vae import TrajectoryVAE
from traj_forecast_ros.train import common
from traj_forecast_ros.train import flow as flow_training
from traj_forecast_ros.train import trainer as training
from traj_forecast_ros.train.data import TrackExamples, build_image_encoder, image_features
from traj_forecast_ros.train.flow import FlowObjective, cached_latents, train_flow
from traj_forecast_ros.model.presets import tiny_blocks_config
from traj_forecast_ros.train.regressor import RegressorObjective, TrackRegressor, load_regressor, train_regressor
from traj_forecast_ros.train.vae import VAEObjective, load_vae_dir, train_vae



def examples_for(data_dir, config, tmp_path):
    dataset = TrajectoryDataset(data_dir)
    encoder = build_image_encoder(config)
    return TrackExamples(dataset, image_features(dataset, encoder, tmp_path), config)


def fixed_loss(objective, batch):
    """The objective on a fixed batch with a fixed generator (no gradient)."""
    with torch.no_grad():
        return float(objective(**batch, generator=torch.Generator().manual_seed(123))["loss"])


def run_steps(objective, model, make_batch, count, tmp_path, steps, lr=3e-3):
    train_settings = common.TrainSettings(steps=steps, batch_size=4, lr=lr, warmup_steps=0, log_every=1, seed=0,
                                          device="cpu", progress=False)
    trainer = training.Trainer(objective, model, make_batch, count, train_settings, tmp_path,
                             common.DistInfo(), stage="test")
    trainer.fit()
    return trainer


def test_vae_steps_lower_the_loss(tiny_data, tmp_path):
    config = tiny_blocks_config()
    examples = examples_for(tiny_data, config, tmp_path)
    torch.manual_seed(0)
    vae = TrajectoryVAE(config.vae)
    objective = VAEObjective(vae, beta=1e-4, image_size=config.image_size)
    make_batch = lambda idx: {"tracks_norm": examples.tracks_norm(idx), "features": examples.features(idx)}  # noqa
    every = make_batch(np.arange(len(examples)))
    before = fixed_loss(objective, every)
    run_steps(objective, vae, make_batch, len(examples), tmp_path, steps=15)
    assert fixed_loss(objective, every) < 0.5 * before


def test_flow_steps_lower_the_loss(tiny_data, tiny_vae_run, tmp_path):
    config, vae, encoder = load_vae_dir(tiny_vae_run)
    dataset = TrajectoryDataset(tiny_data)
    examples = TrackExamples(dataset, image_features(dataset, encoder, tmp_path), config)
    latents = cached_latents(vae, examples, config, tmp_path, torch.device("cpu"))
    assert latents["mean"].shape == (len(examples), 4, 16, 4) and latents["cond_mean"].shape == (12, 1, 16, 4)
    torch.manual_seed(0)
    denoiser = LatteDenoiser(config.denoiser)
    objective = FlowObjective(denoiser, config.latent_scale, vae.latent_grid)

    def make_batch(idx):
        scenes = idx // examples.num_rollouts
        return {"latent_mean": torch.from_numpy(latents["mean"][idx]),
                "latent_std": torch.from_numpy(latents["std"][idx]),
                "cond_mean": torch.from_numpy(latents["cond_mean"][scenes]),
                "cond_std": torch.from_numpy(latents["cond_std"][scenes]), "features": examples.features(idx)}

    every = make_batch(np.arange(len(examples)))
    before = fixed_loss(objective, every)
    run_steps(objective, denoiser, make_batch, len(examples), tmp_path, steps=25)
    assert fixed_loss(objective, every) < 0.9 * before


def test_regressor_steps_lower_the_loss_and_round_trip(tiny_data, tiny_vae_run, tmp_path, make_settings):
    config = tiny_blocks_config()
    falling = tmp_path / "falling"  # scenes where zero motion is clearly wrong
    generator = GeneratorConfig(num_frames=4, query_grid=(8, 8), query_stride=16.0, query_offset=7.5)
    write_dataset(falling, 8, seed=5, config=generator, kinds=["fall"])
    examples = examples_for(falling, config, tmp_path)
    torch.manual_seed(0)
    regressor = TrackRegressor(config)
    objective = RegressorObjective(regressor)
    fixed = {"tracks_norm": examples.tracks_norm(np.arange(4)), "features": examples.features(np.arange(4))}
    before = fixed_loss(objective, fixed)
    # untrained = zero motion: frame 0 is the grid and every frame equals it
    np.testing.assert_allclose(regressor(fixed["features"][:1]).detach()[0, -1], fixed["tracks_norm"][0, 0], atol=1e-6)
    run_steps(objective, regressor.net, lambda idx: fixed, 4, tmp_path, steps=100, lr=1e-3)  # fit one small batch
    assert fixed_loss(objective, fixed) < 0.7 * before

    out = tmp_path / "regressor"
    train_regressor(tiny_data, out, config, make_settings(steps=2), encoder_dir=tiny_vae_run)
    loaded, encoder = load_regressor(out)
    trained = load_file(str(out / "regressor.safetensors"))
    for key, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, trained[key])


def test_vae_run_directory_has_latent_scale_and_encoder(tiny_vae_run, read_metrics):
    config = ModelConfig.load_yaml(tiny_vae_run / "config.yaml")
    assert config.latent_scale is not None and len(config.latent_scale) == config.vae.latent_channels
    assert all(s > 0 for s in config.latent_scale)
    assert (tiny_vae_run / "image_encoder" / "config.json").is_file()
    assert (tiny_vae_run / "checkpoints" / "last.pt").is_file()
    rows = read_metrics(tiny_vae_run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9)) and "recon_rmse_px" in rows[0]


@pytest.mark.parametrize("still_only", [False, True])
def test_decoder_only_fine_tune_keeps_the_latent_space(tiny_data, tiny_vae_run, tmp_path, make_settings,
                                                      read_metrics, still_only):
    """``decoder_only``: every weight outside the decoder (and the image encoder) is bit-identical to --init's, so
    the latent scale and a flow trained on the old latents stay valid; the decoder's weights moved. The same with
    the latent noise on still tokens only."""
    out = tmp_path / "decoder"
    train_vae(tiny_data, out, tiny_blocks_config(), make_settings(steps=4), init=tiny_vae_run, decoder_only=True,
              recon_delta=0.01, latent_noise=0.1, noise_still_tokens_only=still_only)
    before, after = load_file(str(tiny_vae_run / "vae.safetensors")), load_file(str(out / "vae.safetensors"))
    decoder = ("from_latents.", "decoder_blocks.", "final_layer.")
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved and all(key.startswith(decoder) for key in moved)
    assert all(torch.equal(before[key], after[key]) for key in before if not key.startswith(decoder))
    old, new = ModelConfig.load_yaml(tiny_vae_run / "config.yaml"), ModelConfig.load_yaml(out / "config.yaml")
    assert new.latent_scale == old.latent_scale
    for name in ("config.json", "model.safetensors"):
        assert (out / "image_encoder" / name).read_bytes() == (tiny_vae_run / "image_encoder" / name).read_bytes()
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == 4 and all(r["recon_rmse_px"] > 0 for r in rows)


def test_decoder_only_options_are_checked(tiny_data, tiny_vae_run, tmp_path, make_settings):
    config = tiny_blocks_config()
    with pytest.raises(ValueError, match="needs --init"):
        train_vae(tiny_data, tmp_path / "a", config, make_settings(steps=1), decoder_only=True)
    with pytest.raises(ValueError, match="decoder-only"):
        train_vae(tiny_data, tmp_path / "b", config, make_settings(steps=1), init=tiny_vae_run, latent_noise=0.1)
    with pytest.raises(ValueError, match="needs latent noise"):
        train_vae(tiny_data, tmp_path / "e", config, make_settings(steps=1), init=tiny_vae_run, decoder_only=True,
                  noise_still_tokens_only=True)
    with pytest.raises(ValueError, match="recon_delta > 0"):
        train_vae(tiny_data, tmp_path / "c", config, make_settings(steps=1), init=tiny_vae_run, decoder_only=True,
                  recon_delta=0.0)
    with pytest.raises(ValueError, match="moving_weight >= 0"):
        train_vae(tiny_data, tmp_path / "d", config, make_settings(steps=1), moving_weight=-1.0)


def test_resume_gives_the_same_next_steps(tiny_data, tiny_vae_run, tmp_path, make_settings, read_metrics):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run = dict(vae_dir=tiny_vae_run)
    train_flow(tiny_data, straight, make_settings(steps=4, ema_decay=0.9), **run)
    train_flow(tiny_data, split, make_settings(steps=2, ema_decay=0.9), **run)
    train_flow(tiny_data, split, make_settings(steps=4, ema_decay=0.9), resume=True, **run)
    rows_straight = read_metrics(straight / "metrics.csv")
    rows_split = read_metrics(split / "metrics.csv")
    assert [r["step"] for r in rows_split] == [1, 2, 3, 4]
    for a, b in zip(rows_straight, rows_split):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    final_a, final_b = load_file(str(straight / "denoiser.safetensors")), load_file(str(split / "denoiser.safetensors"))
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


def test_flow_output_is_a_loadable_model_and_fine_tuning_starts_from_it(tiny_data, tiny_vae_run, tmp_path,
                                                                         make_settings):
    from traj_forecast_ros.forecaster import Forecaster

    first = tmp_path / "first"
    train_flow(tiny_data, first, make_settings(steps=3), vae_dir=tiny_vae_run)
    forecaster = Forecaster.from_pretrained(first, device="cpu")
    image = TrajectoryDataset(tiny_data)[0].image
    forecast = forecaster.forecast(image, num_samples=2, seed=0)
    assert forecast.tracks.shape == (2, 4, 8, 8, 2) and np.isfinite(forecast.tracks).all()

    tuned = tmp_path / "tuned"
    train_flow(tiny_data, tuned, make_settings(steps=2, lr=0.0), init=first)  # lr 0: weights must stay the init's
    for name in ("denoiser.safetensors", "vae.safetensors"):
        before, after = load_file(str(first / name)), load_file(str(tuned / name))
        assert all(torch.equal(before[k], after[k]) for k in before), name


def test_fine_tuning_from_official_checkpoints(tiny_data, tiny_vae_run, tmp_path, make_settings):
    config, vae, _ = load_vae_dir(tiny_vae_run)
    torch.manual_seed(1)
    denoiser = LatteDenoiser(config.denoiser)
    prefixed = lambda module: {"model_state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}  # noqa
    torch.save(prefixed(denoiser), tmp_path / "ckpt_epoch=1.pth")
    torch.save(prefixed(vae), tmp_path / "vae.pth")
    out = tmp_path / "from-official"
    train_flow(tiny_data, out, make_settings(steps=1, lr=0.0), init=tmp_path / "ckpt_epoch=1.pth",
               official_config=config, official_vae=tmp_path / "vae.pth")
    saved = load_file(str(out / "denoiser.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in denoiser.state_dict().items())
    with pytest.raises(ValueError, match="--config"):
        train_flow(tiny_data, tmp_path / "x", make_settings(steps=1), init=tmp_path / "ckpt_epoch=1.pth")


def test_dataset_that_does_not_match_the_model_is_refused(tiny_data, tmp_path, make_settings):
    config = dataclasses.replace(tiny_blocks_config(), num_frames=6)
    with pytest.raises(DatasetError, match="frames"):
        train_vae(tiny_data, tmp_path / "bad", config, make_settings(steps=1))


def test_mean_latent_draw_trains_on_posterior_means_and_is_saved(tiny_data, tiny_vae_run, tmp_path, make_settings):
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.train.flow import latent_scale_from

    config, vae, _ = load_vae_dir(tiny_vae_run)
    mean = torch.randn(2, 4, 16, 4)
    wide, narrow = torch.full_like(mean, 5.0), torch.full_like(mean, 0.01)
    objective = FlowObjective(LatteDenoiser(config.denoiser), [1.0] * 4, vae.latent_grid, latent_draw="mean")
    a = objective.scaled_grid(mean, wide, torch.Generator().manual_seed(0))
    b = objective.scaled_grid(mean, narrow, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # the posterior std plays no part
    sampled = FlowObjective(objective.denoiser, [1.0] * 4, vae.latent_grid).scaled_grid(
        mean, wide, torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, a)
    with pytest.raises(ValueError, match="latent_draw"):
        FlowObjective(objective.denoiser, [1.0] * 4, vae.latent_grid, latent_draw="median")

    # scale: std of the means only (a constant posterior std of 3 adds 9 to the variance of the draws)
    latents = {"mean": np.stack([np.full((4, 16, 4), -1.0), np.full((4, 16, 4), 1.0)]).astype(np.float32),
               "std": np.full((2, 4, 16, 4), 3.0, np.float32)}
    np.testing.assert_allclose(latent_scale_from(latents, "mean"), [1.0] * 4)
    np.testing.assert_allclose(latent_scale_from(latents, "sample"), [np.sqrt(10.0)] * 4)

    out = tmp_path / "mean_run"
    train_flow(tiny_data, out, make_settings(steps=2), vae_dir=tiny_vae_run, latent_draw="mean")
    assert ModelConfig.load_yaml(out / "config.yaml").latent_draw == "mean"
    forecaster = Forecaster.from_pretrained(out, device="cpu")
    image = TrajectoryDataset(tiny_data)[0].image
    T, C, h, w = forecaster.latent_shape
    flow = torch.randn(2, T - 1, C, h, w, generator=torch.Generator().manual_seed(0))
    full = torch.cat([100.0 * torch.ones(2, 1, C, h, w), flow], dim=1)  # a huge conditioning eps is ignored
    np.testing.assert_array_equal(forecaster.forecast(image, num_samples=2, initial_noise=full).tracks,
                                  forecaster.forecast(image, num_samples=2, initial_noise=flow).tracks)


def test_model_config_rejects_an_unknown_latent_draw():
    with pytest.raises(ValueError, match="latent_draw"):
        ModelConfig(latent_draw="median")
    assert ModelConfig.from_dict(ModelConfig(latent_draw="mean").to_dict()).latent_draw == "mean"


class _FixedTracks:
    """Stands in for TrackExamples: ``tracks_pixels`` of hand-made tracks."""

    def __init__(self, tracks: np.ndarray) -> None:
        self.tracks = tracks

    def __len__(self) -> int:
        return len(self.tracks)

    def tracks_pixels(self, examples):
        return self.tracks[np.asarray(examples)]


def test_moving_token_maps_mark_the_latent_tokens_of_moving_points():
    """A 4x4 query grid on 2x2 latent tokens: a token is moving when one of its 2x2 points gets more than 5 px
    from frame 0 at some frame (the evaluation's rule), out-and-back included; exactly 5 px is still."""
    ys, xs = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    still = np.broadcast_to(np.stack([xs, ys], -1), (3, 4, 4, 2)).copy()  # [T, Hq, Wq, 2]
    first, second = still.copy(), still.copy()
    first[1, 0, 3, 0] += 6.0  # out 6 px and back: token (0, 1)
    second[:, 3, 3, 1] += [0.0, 2.0, 5.0]  # exactly 5 px: still
    second[2, 2, 0] += [3.0, 4.1]  # 5.08 px: token (1, 0)
    maps = flow_training.moving_token_maps(_FixedTracks(np.stack([first, second])), (2, 2), chunk=1)
    np.testing.assert_array_equal(maps, [[[False, True], [False, False]], [[False, False], [True, False]]])
    with pytest.raises(ValueError, match="does not split"):
        flow_training.moving_token_maps(_FixedTracks(np.stack([first])), (3, 3))


def test_flow_moving_weight_changes_only_the_weighting(tiny_data, tiny_vae_run, tmp_path, make_settings):
    config, vae, _ = load_vae_dir(tiny_vae_run)
    torch.manual_seed(0)
    denoiser = LatteDenoiser(config.denoiser)
    batch = {"latent_mean": torch.randn(3, 4, 16, 4), "latent_std": torch.ones(3, 4, 16, 4),
             "cond_mean": torch.randn(3, 1, 16, 4), "cond_std": torch.ones(3, 1, 16, 4),
             "features": torch.randn(3, config.denoiser.num_frame_tokens, config.denoiser.frame_features_dim)}
    moving = torch.zeros(3, *vae.latent_grid, dtype=torch.bool)
    moving[0, 0, 0] = True
    plain = FlowObjective(denoiser, config.latent_scale, vae.latent_grid, latent_draw="mean")
    weighted = FlowObjective(denoiser, config.latent_scale, vae.latent_grid, latent_draw="mean", moving_weight=8.0)
    assert fixed_loss(weighted, {**batch, "moving": torch.zeros_like(moving)}) == pytest.approx(fixed_loss(plain, batch))
    assert fixed_loss(plain, {**batch, "moving": moving}) == pytest.approx(fixed_loss(plain, batch))
    assert fixed_loss(weighted, {**batch, "moving": moving}) != pytest.approx(fixed_loss(plain, batch))
    with pytest.raises(ValueError, match="moving_weight"):
        FlowObjective(denoiser, config.latent_scale, vae.latent_grid, moving_weight=-1.0)
    out = tmp_path / "weighted"
    train_flow(tiny_data, out, make_settings(steps=2), vae_dir=tiny_vae_run, moving_weight=8.0)
    assert (out / "denoiser.safetensors").is_file()
