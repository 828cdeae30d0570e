"""Checkpoints: official .pth loading (prefixes, strictness, damaged files) and model directories."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict

import pytest
import torch

from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.model.checkpoint import (
    build_modules,
    export_official,
    load_model_dir,
    load_official,
    save_model_dir,
    strip_prefixes,
)
from traj_forecast_ros.model.config import ModelConfig


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""


def official_checkpoint(module: torch.nn.Module, prefix: str, path: Path, with_training_state: bool = True) -> Path:
    """Write ``module`` the way the official trainers do (DDP/compile prefixes, optimizer, step, epoch, wandb)."""
    state = {prefix + key: value for key, value in module.state_dict().items()}
    content: Dict[str, object] = {"model_state_dict": state}
    if with_training_state:
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=6e-5)
        content.update(
            optimizer_state_dict=optimizer.state_dict(),
            lr_scheduler_state_dict={"last_epoch": 3, "warmup_steps": 1440},
            step=1234,
            epoch=7,
            wandb={"run": {"id": "abc123", "name": "latte-run"}},
        )
    torch.save(content, path)
    return path


@pytest.fixture
def trained(tiny: ModelConfig, randomize, tmp_path: Path):
    """A tiny model with random (non-initial) weights, saved in the official on-disk form."""
    torch.manual_seed(0)
    denoiser, vae = build_modules(tiny)
    randomize(denoiser, seed=1, std=0.05)
    randomize(vae, seed=2, std=0.05)
    denoiser_path = official_checkpoint(denoiser, "module._orig_mod.", tmp_path / "ckpt_epoch=7.pth")
    vae_path = official_checkpoint(vae, "module.", tmp_path / "303.pth", with_training_state=False)
    return denoiser.eval(), vae.eval(), denoiser_path, vae_path


def sample_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(2, 4, 4, 4, 4, generator=gen),
        t=torch.rand(2, generator=gen),
        features=torch.randn(2, 16, 32, generator=gen),
        text=torch.randn(2, 32, generator=gen),
        tracks=torch.rand(2, 4, 2, 8, 8, generator=gen) * 2 - 1,
    )


def assert_same_outputs(denoiser_a, vae_a, denoiser_b, vae_b) -> None:
    data = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            denoiser_a(data["x"], data["t"], data["features"], data["text"]),
            denoiser_b(data["x"], data["t"], data["features"], data["text"]),
            rtol=0, atol=0,
        )
        mean_a, std_a = vae_a.encode(data["tracks"], data["features"])
        mean_b, std_b = vae_b.encode(data["tracks"], data["features"])
        torch.testing.assert_close(mean_a, mean_b, rtol=0, atol=0)
        torch.testing.assert_close(std_a, std_b, rtol=0, atol=0)
        torch.testing.assert_close(vae_a.decode(mean_a, data["features"]), vae_b.decode(mean_a, data["features"]),
                                   rtol=0, atol=0)


def test_strip_prefixes_any_order() -> None:
    state = {"module._orig_mod.blocks.0.attn.q.weight": 1, "_orig_mod.module.pos_embed": 2,
             "module.module.final_layer.adaLN_modulation.1.bias": 3, "x_embedder.proj.bias": 4}
    assert strip_prefixes(state) == {"blocks.0.attn.q.weight": 1, "pos_embed": 2,
                                     "final_layer.adaLN_modulation.1.bias": 3, "x_embedder.proj.bias": 4}
    with pytest.raises(CheckpointError, match="two entries for 'pos_embed'"):
        strip_prefixes({"module.pos_embed": 1, "pos_embed": 2})


def test_official_checkpoint_loads_strictly_and_reproduces_outputs(tiny: ModelConfig, trained) -> None:
    denoiser, vae, denoiser_path, vae_path = trained
    loaded_denoiser, loaded_vae = load_official(tiny, denoiser_path, vae_path)
    assert not loaded_denoiser.training and not loaded_vae.training
    assert_same_outputs(denoiser, vae, loaded_denoiser, loaded_vae)


def test_bare_state_dict_is_accepted(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    denoiser, vae, _, vae_path = trained
    bare = tmp_path / "bare.pth"
    torch.save(denoiser.state_dict(), bare)
    loaded_denoiser, loaded_vae = load_official(tiny, bare, vae_path)
    assert_same_outputs(denoiser, vae, loaded_denoiser, loaded_vae)


def test_truncated_file_is_reported(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    _, _, denoiser_path, vae_path = trained
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(denoiser_path.read_bytes()[:2000])
    unreadable = r"truncated\.pth is not a readable checkpoint \(truncated or corrupt\?\)"
    with pytest.raises(CheckpointError, match=unreadable):
        load_official(tiny, truncated, vae_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth is not a readable checkpoint"):
        load_official(tiny, garbage, vae_path)


def test_missing_file_is_weights_not_found(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    _, _, denoiser_path, _ = trained
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        load_official(tiny, denoiser_path, tmp_path / "nowhere.pth")
    with pytest.raises(WeightsNotFoundError, match="VAE checkpoint path is required"):
        load_official(tiny, denoiser_path)


def test_wrong_architecture_lists_keys_and_shapes(tiny: ModelConfig, trained) -> None:
    _, _, denoiser_path, vae_path = trained
    deeper = dataclasses.replace(tiny, denoiser=dataclasses.replace(tiny.denoiser, depth=4))
    with pytest.raises(CheckpointError) as excinfo:
        load_official(deeper, denoiser_path, vae_path)
    message = str(excinfo.value)
    assert str(denoiser_path) in message and "denoiser architecture" in message
    assert "missing keys 44: blocks.2." in message and "(+39 more)" in message

    wider = dataclasses.replace(tiny, denoiser=dataclasses.replace(tiny.denoiser, frame_features_dim=48))
    mismatch = r"shape mismatches 1: frame_proj.weight: file \[64, 32\] vs model \[64, 48\]"
    with pytest.raises(CheckpointError, match=mismatch):
        load_official(wider, denoiser_path, vae_path)

    no_text = dataclasses.replace(tiny, denoiser=dataclasses.replace(tiny.denoiser, text_embed_dim=None))
    with pytest.raises(CheckpointError, match="unexpected keys 4: text_embeds_proj.fc1.bias"):
        load_official(no_text, denoiser_path, vae_path)


def test_swapped_files_get_a_hint(tiny: ModelConfig, trained) -> None:
    _, _, denoiser_path, vae_path = trained
    with pytest.raises(CheckpointError, match="looks like a trajectory VAE checkpoint"):
        load_official(tiny, vae_path, denoiser_path)


def test_nan_weights_are_named(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    denoiser, _, _, vae_path = trained
    state = denoiser.state_dict()
    state["blocks.1.mlp.fc2.weight"] = state["blocks.1.mlp.fc2.weight"].clone()
    state["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    state["final_layer.linear.bias"] = torch.full_like(state["final_layer.linear.bias"], float("inf"))
    path = tmp_path / "nan.pth"
    torch.save({"model_state_dict": state, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in tensors 2: blocks.1.mlp.fc2.weight, "
                                              r"final_layer.linear.bias"):
        load_official(tiny, path, vae_path)


def test_pickled_objects_are_refused(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    denoiser, _, _, vae_path = trained
    path = tmp_path / "objects.pth"
    torch.save({"model_state_dict": denoiser.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official(tiny, path, vae_path)


def test_unexpected_layout_is_reported(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    _, _, _, vae_path = trained
    path = tmp_path / "odd.pth"
    torch.save({"weights": {"a": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="no 'model_state_dict' entry"):
        load_official(tiny, path, vae_path)


def test_table_mismatch_warns_but_loads(tiny: ModelConfig, trained, tmp_path: Path, caplog) -> None:
    denoiser, vae, _, vae_path = trained
    state = denoiser.state_dict()
    state["temp_embed"] = state["temp_embed"] + 0.5
    path = tmp_path / "shifted.pth"
    torch.save({"model_state_dict": state}, path)
    with caplog.at_level(logging.WARNING, logger="traj_forecast_ros.model.checkpoint"):
        loaded, _ = load_official(tiny, path, vae_path)
    assert "fixed table 'temp_embed' differs" in caplog.text and "shifted.pth" in caplog.text
    torch.testing.assert_close(loaded.temp_embed, state["temp_embed"])  # checkpoint values are kept


def test_model_dir_round_trip(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    denoiser, vae, _, _ = trained
    out = save_model_dir(tmp_path / "model", tiny, denoiser, vae)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "denoiser.safetensors", "vae.safetensors"]
    config, loaded_denoiser, loaded_vae = load_model_dir(out)
    assert config == tiny
    assert_same_outputs(denoiser, vae, loaded_denoiser, loaded_vae)


def test_export_official_and_encoders(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    denoiser, vae, denoiser_path, vae_path = trained

    class FakeEncoder:
        def __init__(self) -> None:
            self.saved_to = None

        def save_pretrained(self, path) -> None:
            self.saved_to = Path(path)
            self.saved_to.mkdir()
            (self.saved_to / "config.json").write_text("{}")

    image_encoder, text_encoder = FakeEncoder(), FakeEncoder()
    out = export_official(tiny, denoiser_path, vae_path, tmp_path / "exported", image_encoder, text_encoder)
    assert image_encoder.saved_to == out / "image_encoder" and text_encoder.saved_to == out / "text_encoder"
    _, loaded_denoiser, loaded_vae = load_model_dir(out)
    assert_same_outputs(denoiser, vae, loaded_denoiser, loaded_vae)


def test_raw_model_dir_has_no_vae(tiny: ModelConfig, randomize, tmp_path: Path) -> None:
    raw = dataclasses.replace(
        tiny, vae=None, latent_scale=None,
        denoiser=dataclasses.replace(tiny.denoiser, latent=False, in_channels=2, input_size=8, patch_size=2),
    )
    denoiser, vae = build_modules(raw)
    assert vae is None
    randomize(denoiser)
    out = save_model_dir(tmp_path / "raw", raw, denoiser, None)
    config, loaded, loaded_vae = load_model_dir(out)
    assert config.vae is None and loaded_vae is None
    torch.testing.assert_close(loaded.state_dict()["x_encoder.lff.scale"], denoiser.state_dict()["x_encoder.lff.scale"])
    (out / "vae.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="raw model"):
        load_model_dir(out)
    with pytest.raises(ValueError, match="VAE exactly when"):
        save_model_dir(tmp_path / "bad", raw, denoiser, torch.nn.Linear(1, 1))


def test_model_dir_errors(tiny: ModelConfig, trained, tmp_path: Path) -> None:
    denoiser, vae, _, _ = trained
    with pytest.raises(WeightsNotFoundError, match="model directory not found"):
        load_model_dir(tmp_path / "absent")
    out = save_model_dir(tmp_path / "model", tiny, denoiser, vae)
    data = (out / "vae.safetensors").read_bytes()
    (out / "vae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"vae.safetensors is not a readable checkpoint \(truncated or corrupt"):
        load_model_dir(out)
    (out / "vae.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="vae.safetensors"):
        load_model_dir(out)
    (out / "config.yaml").write_text("name: tiny\nbogus_key: 1\n")
    with pytest.raises(CheckpointError, match="not a valid model config.*bogus_key"):
        load_model_dir(out)
    (out / "config.yaml").unlink()
    with pytest.raises(WeightsNotFoundError, match="config.yaml"):
        load_model_dir(out)


def test_save_and_read_tensors_are_public(tmp_path):
    from traj_forecast_ros.model import checkpoint, config

    for name in ("CONFIG_FILE", "DENOISER_FILE", "VAE_FILE", "IMAGE_ENCODER_DIR", "TEXT_ENCODER_DIR"):
        assert getattr(checkpoint, name) == getattr(config, name)  # one definition, re-exported
    layer = torch.nn.Linear(3, 2)
    path = tmp_path / "layer.safetensors"
    checkpoint.save_tensors(layer, path)
    assert not (tmp_path / "layer.safetensors.partial").exists()
    loaded = checkpoint.read_safetensors(path)
    assert set(loaded) == {"weight", "bias"} and torch.equal(loaded["weight"], layer.weight.detach())
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="layer.safetensors is not a readable checkpoint"):
        checkpoint.read_safetensors(path)
    with pytest.raises(WeightsNotFoundError, match="missing.safetensors"):
        checkpoint.read_safetensors(tmp_path / "missing.safetensors")
