"""Shared stage setup: the text encoder a flow run conditions on is the one it saves; the latent cache key follows the
dataset and the image encoder; prepare_examples / TrackExamples.batch."""

import dataclasses
import shutil

import numpy as np
import torch

from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.data.scenes import GeneratorConfig
from traj_forecast_ros.data.synthetic import write_dataset
from traj_forecast_ros.model.config import ModelConfig, TextEncoderConfig
from traj_forecast_ros.train import common, flow
from traj_forecast_ros.train import trainer as training
from traj_forecast_ros.train.data import (TrackExamples, build_image_encoder, build_text_encoder, image_features,
                                          prepare_examples)
from traj_forecast_ros.model.presets import tiny_blocks_config

TEXT = TextEncoderConfig(model_id=None, config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, projection_dim=32,
                                                    max_position_embeddings=77))


def text_config(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, text_encoder=TEXT, default_instruction="push the red block",
                               denoiser=dataclasses.replace(config.denoiser, text_embed_dim=32))


def test_build_text_encoder_is_deterministic_in_the_seed():
    config = text_config(tiny_blocks_config())
    a, b, c = (build_text_encoder(config, seed=s) for s in (0, 0, 1))
    state_a, state_b, state_c = (e.model.state_dict() for e in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert build_text_encoder(tiny_blocks_config()) is None  # no text tower in the config


def test_flow_saves_the_text_encoder_it_trained_with(tiny_data, tiny_vae_run, tmp_path, make_settings, monkeypatch):
    from traj_forecast_ros.model.encoders import TextEncoder

    vae_dir = tmp_path / "vae"
    shutil.copytree(tiny_vae_run, vae_dir, ignore=shutil.ignore_patterns("checkpoints", "cache", "tensorboard"))
    config = text_config(ModelConfig.load_yaml(vae_dir / "config.yaml"))
    config.save_yaml(vae_dir / "config.yaml")
    batches = []

    class RecordingTrainer(training.Trainer):
        def __init__(self, objective, model, make_batch, *args, **kwargs):
            batches.append(make_batch(np.arange(2)))
            super().__init__(objective, model, make_batch, *args, **kwargs)

    monkeypatch.setattr(flow, "Trainer", RecordingTrainer)
    out = tmp_path / "flow"
    flow.train_flow(tiny_data, out, make_settings(steps=1), vae_dir=vae_dir)
    trained_with = batches[0]["text_embeds"]
    assert trained_with.shape == (2, 32)
    saved = TextEncoder.from_config(config.text_encoder, model_dir=out)
    with torch.inference_mode():
        embedded = saved([config.default_instruction]).float()
    torch.testing.assert_close(embedded.expand(2, -1), trained_with, rtol=0, atol=0)
    reference = build_text_encoder(config, seed=0).model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in saved.model.state_dict().items())


def test_latent_cache_key_follows_dataset_and_image_encoder(tiny_data, tiny_vae_run, tmp_path, monkeypatch):
    from traj_forecast_ros.train.vae import load_vae_dir

    config, vae, encoder = load_vae_dir(tiny_vae_run)
    calls = []

    def fake_encode(vae, examples, config, device, progress=False):
        calls.append(examples)
        return {"mean": np.zeros((len(examples), 1), np.float32)}

    monkeypatch.setattr(flow, "encode_latents", fake_encode)
    dataset = TrajectoryDataset(tiny_data)
    features = image_features(dataset, encoder, tmp_path)
    cpu = torch.device("cpu")
    for key in ("encoder-a", "encoder-a", "encoder-b", None, None):
        flow.cached_latents(vae, TrackExamples(dataset, features, config, features_key=key), config, tmp_path, cpu)
    assert len(calls) == 3  # one per distinct features identity; repeats come from the cache

    other = tmp_path / "other"  # same geometry and size, different scenes
    generator = GeneratorConfig(num_frames=4, query_grid=(8, 8), query_stride=16.0, query_offset=7.5, rollouts=2)
    write_dataset(other, len(dataset), seed=11, config=generator,
                  kinds=["fall", "stack", "topple", "ramp", "slide", "rest"])
    flow.cached_latents(vae, TrackExamples(TrajectoryDataset(other), features, config, features_key="encoder-a"),
                        config, tmp_path, cpu)
    assert len(calls) == 4  # another dataset: not the first one's cached latents
    assert len(list((tmp_path / "cache").glob("latents-*.npz"))) == 4


def test_prepare_examples_saves_the_encoder_and_batches_match(tiny_data, tmp_path, make_settings):
    config = tiny_blocks_config()
    settings = make_settings()
    out = tmp_path / "run"
    encoder, examples = prepare_examples(tiny_data, config, out, common.DistInfo(), settings)
    assert (out / "image_encoder" / "config.json").is_file()
    reference = build_image_encoder(config, seed=settings.seed).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in encoder.state_dict().items())
    assert examples.features_key is not None and len(examples) == 24
    indices = np.array([5, 0, 23, 5])
    batch = examples.batch(indices)
    assert set(batch) == {"tracks_norm", "features"}
    assert torch.equal(batch["tracks_norm"], examples.tracks_norm(indices))
    assert torch.equal(batch["features"], examples.features(indices))
    again, resumed = prepare_examples(tiny_data, config, out, common.DistInfo(), settings, resume=True)
    np.testing.assert_array_equal(resumed.features_all, examples.features_all)
