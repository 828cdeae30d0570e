"""The one offline-model policy (``bag.model_choice``): which model runs when none is named, without network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from traj_forecast_ros import registry
from traj_forecast_ros.bag import model_choice
from traj_forecast_ros.errors import WeightsNotFoundError
from traj_forecast_ros.model.checkpoint import build_modules, save_model_dir
from traj_forecast_ros.model.presets import tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def without_demo(tmp_path, monkeypatch) -> None:
    """The real registry copied where its relative ``local_dir`` (the shipped demo model) does not exist."""
    copy = tmp_path / "registry" / "registry.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO / "models" / "registry.yaml", copy)
    monkeypatch.setenv(registry.REGISTRY_ENV, str(copy))


def _download_libero(cache_root: Path) -> None:
    config = tiny_config(text=False)
    save_model_dir(registry.model_cache_dir(model_choice.LIBERO_MODEL), config, *build_modules(config))


def test_shipped_sim_model_wins_on_a_cpu_even_when_libero_is_downloaded(cache_root, monkeypatch):
    shipped = registry.load_registry()
    assert registry.has_weights(shipped[model_choice.SIM_MODEL].local_dir)  # both ship with the package
    assert registry.has_weights(shipped[model_choice.DEMO_MODEL].local_dir)
    monkeypatch.setattr(model_choice, "_cuda_available", lambda: False)
    name, why = model_choice.best_offline_model()
    assert name == model_choice.SIM_MODEL and "traj-forecast download libero-atm" in why
    assert "simulated LIBERO-like manipulation" in why
    _download_libero(cache_root)
    name, why = model_choice.best_offline_model()
    assert name == model_choice.SIM_MODEL and "without a GPU" in why


def test_downloaded_libero_wins_with_a_gpu(cache_root, monkeypatch):
    monkeypatch.setattr(model_choice, "_cuda_available", lambda: True)
    assert model_choice.best_offline_model()[0] == model_choice.SIM_MODEL  # GPU, but LIBERO not downloaded
    _download_libero(cache_root)
    assert model_choice.best_offline_model()[0] == model_choice.LIBERO_MODEL


def test_libero_on_a_cpu_when_the_demo_model_is_missing(cache_root, without_demo, monkeypatch):
    monkeypatch.setattr(model_choice, "_cuda_available", lambda: False)
    _download_libero(cache_root)
    name, why = model_choice.best_offline_model()
    assert name == model_choice.LIBERO_MODEL and "slow on a CPU" in why


def test_no_model_offline_says_how_to_get_one_and_the_fallback_writes_an_untrained_model(
        cache_root, without_demo, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="traj-forecast download libero-atm"):
        model_choice.best_offline_model()
    directory = tmp_path / "untrained"
    model, why = model_choice.untrained_fallback(str(directory))
    assert model == str(directory) and why.startswith("UNTRAINED")
    assert registry.has_weights(directory) and registry.resolve(directory) == directory


def test_shipped_sim_model_is_preferred_over_demo_blocks_when_present(cache_root, tmp_path, monkeypatch):
    """The registry's sim-manipulation entry loads while its directory is absent; once the pipeline has written it,
    it wins over demo-blocks offline (a downloaded LIBERO on a GPU still wins)."""
    copy = tmp_path / "registry" / "registry.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO / "models" / "registry.yaml", copy)
    monkeypatch.setenv(registry.REGISTRY_ENV, str(copy))
    monkeypatch.setattr(model_choice, "_cuda_available", lambda: False)
    entries = registry.load_registry()
    assert entries[model_choice.SIM_MODEL].local_dir == (copy.parent / "sim-manipulation").resolve()
    config = tiny_config(text=False)
    save_model_dir(copy.parent / "demo-blocks", config, *build_modules(config))
    assert model_choice.best_offline_model()[0] == model_choice.DEMO_MODEL  # sim directory absent
    with pytest.raises(WeightsNotFoundError, match="should ship with the package"):
        registry.resolve(model_choice.SIM_MODEL)
    save_model_dir(copy.parent / "sim-manipulation", config, *build_modules(config))
    name, why = model_choice.best_offline_model()
    assert name == model_choice.SIM_MODEL and "simulated" in why
    _download_libero(cache_root)
    assert model_choice.best_offline_model()[0] == model_choice.SIM_MODEL  # LIBERO on a CPU is too slow
    monkeypatch.setattr(model_choice, "_cuda_available", lambda: True)
    assert model_choice.best_offline_model()[0] == model_choice.LIBERO_MODEL
