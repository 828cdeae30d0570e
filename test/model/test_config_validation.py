"""A model directory's config is checked before any module is built (issue 21, defect 6): types, ranges and the
weights' shapes (read from the safetensors headers only) against what the config implies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from traj_forecast_ros.errors import CheckpointError
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model import checkpoint
from traj_forecast_ros.model.checkpoint import load_model_dir
from traj_forecast_ros.model.config import CONFIG_FILE


@pytest.fixture
def saved_model(tiny_model_dir: Path) -> Path:
    """The session's tiny text-conditioned model directory (test/conftest.py); tests edit copies of it."""
    return tiny_model_dir


def edited_copy(saved_model: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny model directory whose config.yaml went through ``edit(dict)``."""
    import shutil

    directory = tmp_path / "edited"
    shutil.copytree(saved_model, directory)
    data = yaml.safe_load((directory / CONFIG_FILE).read_text())
    edit(data)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(data))
    return directory


@pytest.fixture
def only_meta_builds(monkeypatch):
    """Fail the test if a module is built with real memory before the shapes were compared."""
    original = checkpoint.build_modules

    def build_on_meta_only(config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("modules were built with memory before the weights' shapes were checked")
        return original(config)

    monkeypatch.setattr(checkpoint, "build_modules", build_on_meta_only)


def test_a_config_naming_a_huge_denoiser_is_refused_from_the_headers_without_building_it(saved_model, tmp_path,
                                                                                          only_meta_builds):
    def huge(data):
        data["denoiser"]["hidden_size"] = 2048
        data["denoiser"]["depth"] = 12

    directory = edited_copy(saved_model, tmp_path, huge)
    with pytest.raises(CheckpointError, match=r"denoiser\.safetensors: does not match the denoiser architecture"):
        load_model_dir(directory)


def test_a_config_whose_vae_disagrees_with_its_weights_is_refused_before_building(saved_model, tmp_path,
                                                                                  only_meta_builds):
    directory = edited_copy(saved_model, tmp_path, lambda data: data["vae"].update(latent_channels=8))
    with pytest.raises(CheckpointError, match="latent_scale has 4 entries|vae.safetensors"):
        load_model_dir(directory)


def test_absurd_sizes_are_refused_by_range_before_anything_is_built(saved_model, tmp_path, only_meta_builds):
    directory = edited_copy(saved_model, tmp_path, lambda data: data["denoiser"].update(hidden_size=2**40))
    with pytest.raises(CheckpointError, match=r"denoiser\.hidden_size must be in \[1, 65536\]"):
        load_model_dir(directory)


@pytest.mark.parametrize("edit, message", [
    (lambda data: data.update(latent_scale=[[1.0, 1.0]] * 4), r"latent_scale\[0\] must be a finite number"),
    (lambda data: data.update(latent_scale=[1.0, 0.0, 1.0, 1.0]), "latent_scale entries must be > 0"),
    (lambda data: data.update(latent_scale=[1.0, 1.0]), "latent_scale has 2 entries"),
    (lambda data: data.update(num_frames=4.0), "num_frames must be an integer, got float"),
    (lambda data: data.update(default_instruction={"a": 1}), "default_instruction must be a string"),
    (lambda data: data["denoiser"].update(num_heads=0), r"denoiser.num_heads must be in \[1, "),
    (lambda data: data["vae"].update(patch_size=3), "vae.input_size 8 is not a multiple of patch_size 3"),
    (lambda data: data.update(image_size=[32, "wide"]), r"image_size\[1\] must be an integer"),
    (lambda data: data.update(query_stride=float("nan")), "query_stride must be a finite number"),
    (lambda data: data["denoiser"].update(latent="yes"), "denoiser.latent must be true or false"),
    (lambda data: data["denoiser"].update(input_size=8192, patch_size=1), "sin-cos table of 67108864 x 64"),
], ids=["nested-list-scale", "zero-scale", "short-scale", "float-frames", "dict-instruction", "zero-heads",
        "patch-size", "string-size", "nan-stride", "string-bool", "huge-token-grid"])
def test_wrong_types_and_values_are_a_clear_checkpoint_error_at_load(saved_model, tmp_path, edit, message):
    directory = edited_copy(saved_model, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        Forecaster.from_pretrained(directory, device="cpu")


def test_the_untouched_model_still_loads(saved_model):
    config, denoiser, vae = load_model_dir(saved_model)
    assert config.num_frames == 4 and vae is not None and next(denoiser.parameters()).device.type == "cpu"
