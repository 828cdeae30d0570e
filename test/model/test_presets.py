"""The one preset table (model/sizes.py): every named architecture builds, LIBERO's numbers come from its one line,
the denoiser sizes, and ``--config`` resolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from traj_forecast_ros.model import sizes
from traj_forecast_ros.model.config import DenoiserConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig, VAEConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.encoders import CLIP_L14_TEXT, DINOV2_LARGE
from traj_forecast_ros.model.presets import (
    LIBERO_ATM_LATENT_SCALE,
    PRESETS,
    denoiser_config,
    libero_config,
    preset_config,
    resolve_config,
    tiny_config,
)
from traj_forecast_ros.model.vae import TrajectoryVAE

# The official LIBERO model (spec sections 3-6, the released checkpoints), written out here once to check the table.
OFFICIAL_LIBERO = dict(image=128, grid=64, stride=2.0, offset=1.5, frames=16,
                       vae=dict(patch_size=4, hidden_size=384, encoder_depth=12, decoder_depth=12, num_heads=6,
                                latent_channels=8, pos_embed_dim=128, num_frame_tokens=81, frame_features_dim=1024),
                       denoiser=dict(input_size=16, patch_size=1, in_channels=8, hidden_size=384, depth=12,
                                     num_heads=6, text_embed_dim=768),
                       encoders=("facebook/dinov2-large", "openai/clip-vit-large-patch14"))


def test_size_presets_follow_the_official_get_model() -> None:
    expected = {"XS": (8, 192, 3), "S": (12, 384, 6), "B": (12, 384, 6), "L": (16, 768, 12)}
    for size, (depth, hidden, heads) in expected.items():
        cfg = denoiser_config(size, input_size=4, text_embed_dim=None)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.input_size) == (depth, hidden, heads, 4)
    model = LatteDenoiser(denoiser_config("XS", input_size=2, in_channels=2, num_frames=2, num_frame_tokens=1,
                                          frame_features_dim=4, text_embed_dim=None))
    assert len(model.blocks) == 8 and model.cfg.hidden_size == 192
    with pytest.raises(ValueError, match="unknown denoiser size"):
        denoiser_config("XL")
    with pytest.raises(TypeError):
        denoiser_config("B", no_such_field=1)


def test_every_preset_builds_a_fresh_consistent_config() -> None:
    assert set(PRESETS) == {"libero-atm", "libero-tramoe", "demo-blocks", "tiny-blocks", "tiny", "sim-manipulation",
                            "tiny-sim"}
    for name in PRESETS:
        config = preset_config(name)
        assert config.name == name
        assert ModelConfig.from_dict(config.to_dict()) == config  # YAML-safe round trip
        if config.vae is not None:
            assert config.vae.input_size == config.query_grid[0] and config.vae.num_frames == config.num_frames
            assert config.denoiser.in_channels == config.vae.latent_channels
        config.name = "changed"
        assert preset_config(name).name == name  # callers get their own copy
    assert libero_config("atm").denoiser == denoiser_config("B")  # Latte-B
    assert preset_config("libero-atm").latent_scale == list(LIBERO_ATM_LATENT_SCALE)
    with pytest.raises(ValueError, match="unknown LIBERO split"):
        libero_config("libero")
    with pytest.raises(ValueError, match="unknown preset 'libero'"):
        preset_config("libero")


def test_registry_hub_models_name_their_architecture_by_preset() -> None:
    from traj_forecast_ros import registry

    for entry in registry.load_registry().values():
        if entry.is_hub_model and entry.config_file is None:
            assert entry.preset in PRESETS, entry.name
            assert entry.config().denoiser == preset_config(entry.preset).denoiser
    bad = dataclasses.replace(registry.load_registry()["libero-atm"], preset="libero-xl")
    with pytest.raises(ValueError, match="unknown preset 'libero-xl'"):
        bad.config()


def test_resolve_config_takes_a_preset_a_yaml_or_a_model_directory(tmp_path) -> None:
    assert resolve_config("tiny-blocks") == preset_config("tiny-blocks")
    config = preset_config("tiny")
    config.num_frames = 6
    config.save_yaml(tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml") == config
    assert resolve_config(str(tmp_path)) == config
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_config("tiny_blocks")


def test_every_preset_states_its_frame_interval_or_why_it_is_unknown():
    from traj_forecast_ros.model.presets import FRAME_INTERVALS, PRESETS, preset_config

    assert set(FRAME_INTERVALS) == set(PRESETS)
    for name, (seconds, source) in FRAME_INTERVALS.items():
        assert preset_config(name).frame_interval_s == seconds, name
        assert source, name
        if seconds is None:
            assert source.startswith("unknown: "), name
        else:
            assert 0 < seconds < 1, name
    assert "20 Hz" in FRAME_INTERVALS["libero-atm"][1]  # the LIBERO data rate it starts from


def test_the_table_has_one_flat_line_per_model_size_and_each_builds() -> None:
    """Every line is a plain ``Preset`` row; its config builds the denoiser and VAE (on the meta device: no
    memory) with the shapes the config names."""
    assert PRESETS is sizes.PRESETS
    for name, line in PRESETS.items():
        assert isinstance(line, sizes.Preset) and line.family in ("libero", "blocks", "sim", "tiny"), name
        config = preset_config(name)
        with torch.device("meta"):
            denoiser, vae = LatteDenoiser(config.denoiser), TrajectoryVAE(config.vae)
        assert len(denoiser.blocks) == line.denoiser.depth and denoiser.cfg.hidden_size == line.denoiser.width
        assert len(vae.encoder_blocks) == len(vae.decoder_blocks) == line.vae.depth
        assert vae.latent_grid == (line.grid // line.vae.patch,) * 2 and denoiser.input_size == vae.latent_grid
        assert denoiser.num_frame_tokens == vae.num_frame_tokens == (line.image // line.image_encoder[3]) ** 2
        assert (denoiser.text_embed_dim is None) == (line.text_encoder is None) == (config.text_encoder is None)


def test_libero_numbers_live_in_one_line_and_equal_the_official_ones() -> None:
    """The libero-atm line is the only statement of LIBERO's sizes: the preset, the dataclass defaults and the
    registry's hub models all read it, and it equals the official architecture."""
    line, official = sizes.PRESETS["libero-atm"], OFFICIAL_LIBERO
    assert sizes.LIBERO is line
    for split in ("atm", "tramoe"):
        config = libero_config(split)
        assert (config.image_size, config.query_grid) == ((official["image"],) * 2, (official["grid"],) * 2)
        assert (config.query_stride, config.query_offset, config.num_frames) == (official["stride"],
                                                                                 official["offset"], official["frames"])
        assert {key: getattr(config.vae, key) for key in official["vae"]} == official["vae"]
        assert {key: getattr(config.denoiser, key) for key in official["denoiser"]} == official["denoiser"]
        assert (config.image_encoder.model_id, config.text_encoder.model_id) == official["encoders"]
        assert config.vae.num_frames == config.denoiser.num_frames == official["frames"]
    # the dataclass defaults are that line: a config written before the table existed loads the same
    defaults = ModelConfig()
    assert dataclasses.replace(defaults, latent_scale=list(LIBERO_ATM_LATENT_SCALE)) == preset_config("libero-atm")
    assert VAEConfig() == libero_config().vae and DenoiserConfig() == libero_config().denoiser
    assert ImageEncoderConfig().model_id == line.image_encoder.hub_id
    assert TextEncoderConfig().model_id == line.text_encoder.hub_id
    # the random-weight stand-ins of the hub encoders have the line's sizes
    encoder, text = line.image_encoder, line.text_encoder
    assert (DINOV2_LARGE["hidden_size"], DINOV2_LARGE["num_hidden_layers"], DINOV2_LARGE["num_attention_heads"],
            DINOV2_LARGE["patch_size"]) == tuple(encoder[:4])
    assert (CLIP_L14_TEXT["projection_dim"], CLIP_L14_TEXT["num_hidden_layers"],
            CLIP_L14_TEXT["num_attention_heads"]) == (text.patch_or_embed, text.layers, text.heads)
    assert libero_config("tramoe").latent_scale == list(sizes.LIBERO_TRAMOE_LATENT_SCALE)
    assert libero_config("tramoe").latent_scale != libero_config("atm").latent_scale


def test_tiny_config_changes_only_the_sizes_it_is_given() -> None:
    base, wide = tiny_config(), tiny_config(width=32, grid=16, num_frames=6, image_size=64)
    assert base == preset_config("tiny")
    assert (wide.vae.hidden_size, wide.denoiser.hidden_size, wide.vae.input_size, wide.denoiser.input_size) == (
        32, 32, 16, 8)
    assert (wide.num_frames, wide.image_size, wide.vae.num_frame_tokens, wide.query_stride) == (6, (64, 64), 64, 4.0)
    assert tiny_config(text=False).text_encoder is None and tiny_config(text=False).denoiser.text_embed_dim is None
