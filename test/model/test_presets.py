"""The one preset table: every named architecture, the denoiser sizes, and ``--config`` resolution."""

from __future__ import annotations

import dataclasses

import pytest

from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.presets import (
    LIBERO_ATM_LATENT_SCALE,
    PRESETS,
    denoiser_config,
    libero_config,
    preset_config,
    resolve_config,
)


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
    assert preset_config("libero-atm").latent_scale == LIBERO_ATM_LATENT_SCALE
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
