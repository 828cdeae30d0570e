"""Test-wide environment: offline hub, DDS on loopback with a random domain, the large-data Fast DDS profile."""

import os
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(REPO / "config" / "fastdds_large_data.xml"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_images() -> Path:
    """Folder with the real camera frames (LIBERO agent/gripper views, Kubric, Physics101)."""
    if not SHARED_IMAGES.is_dir():
        pytest.fail(f"real test frames missing: {SHARED_IMAGES} (clone next to ../shared)")
    return SHARED_IMAGES


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """An empty model cache (``TRAJ_FORECAST_HOME``) for this test: no hub model is downloaded."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TRAJ_FORECAST_HOME", str(root))
    return root


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """Tiny models run faster on one intra-op thread than on two on the shared 2-core machine (nothing is timed)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def private_cache_home(tmp_path_factory) -> Path:
    """Every test run gets its own empty ``TRAJ_FORECAST_HOME``: no test reads or writes the user's model or
    sampling-plan cache, and no test sees a plan decision probed by an earlier run."""
    root = tmp_path_factory.mktemp("traj_forecast_home")
    previous = os.environ.get("TRAJ_FORECAST_HOME")
    os.environ["TRAJ_FORECAST_HOME"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("TRAJ_FORECAST_HOME", None)
    else:
        os.environ["TRAJ_FORECAST_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model directory with a tiny random text-conditioned model (written once per session)."""
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.checkpoint import save_model_dir
    from traj_forecast_ros.model.presets import tiny_config

    config = tiny_config(text=True)
    forecaster = Forecaster.from_config(config, device="cpu")
    directory = tmp_path_factory.mktemp("models") / "tiny"
    save_model_dir(directory, config, forecaster.denoiser, forecaster.vae, forecaster.image_encoder,
                   forecaster.text_encoder)
    return directory
