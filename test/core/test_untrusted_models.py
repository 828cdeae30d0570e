"""Models from strangers stay inert (issue 11): a pickled payload in any weights file is refused, never run."""

import pickle
from pathlib import Path

import pytest
import torch

from traj_forecast_ros.errors import CheckpointError
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.checkpoint import save_model_dir
from traj_forecast_ros.model.presets import tiny_config


class Payload:
    """Unpickling it creates ``marker``: what a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    config = tiny_config(text=True)
    forecaster = Forecaster.from_config(config, device="cpu")
    directory = tmp_path / "stranger"
    save_model_dir(directory, config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                   forecaster.text_encoder)
    return directory


@pytest.mark.parametrize("encoder", ["image_encoder", "text_encoder"])
def test_a_pickled_encoder_checkpoint_is_refused_and_never_runs(model_dir, tmp_path, encoder):
    marker = tmp_path / "payload_ran"
    for weights in (model_dir / encoder).glob("*.safetensors"):
        weights.unlink()
    torch.save({"evil": Payload(marker)}, model_dir / encoder / "pytorch_model.bin")
    with pytest.raises(Exception) as info:  # transformers reads .bin with torch.load(weights_only=True)
        Forecaster.from_pretrained(str(model_dir), device="cpu")
    assert isinstance(info.value, (pickle.UnpicklingError, CheckpointError, OSError, RuntimeError)), info.value
    assert not marker.exists(), "the pickled payload ran"


def test_model_weights_are_read_only_from_safetensors(model_dir, tmp_path):
    marker = tmp_path / "payload_ran"
    (model_dir / "denoiser.safetensors").unlink()
    torch.save({"evil": Payload(marker)}, model_dir / "denoiser.pth")  # a pickle beside the config is not read
    with pytest.raises(CheckpointError):
        Forecaster.from_pretrained(str(model_dir), device="cpu")
    assert not marker.exists()
