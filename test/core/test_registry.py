"""Model registry: entries, cache location, name resolution, download (offline failure and a faked hub)."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml

from traj_forecast_ros import registry
from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.checkpoint import build_modules, save_model_dir
from traj_forecast_ros.model.presets import (LIBERO_ATM_LATENT_SCALE, LIBERO_TRAMOE_LATENT_SCALE, libero_config,
                                             tiny_config)

REPO = Path(__file__).resolve().parents[2]


def test_registry_lists_the_official_models():
    entries = registry.load_registry()
    assert registry.default_model_name() == "libero-atm"
    assert {"libero-atm", "libero-tramoe", "demo-blocks"} <= set(entries)
    atm, tramoe = entries["libero-atm"], entries["libero-tramoe"]
    assert atm.hub_repo == tramoe.hub_repo == "Gabrijel/what-happens-next"
    assert atm.files["denoiser"].path == "track-generator/libero/atm/latent/ckpt_epoch=1500.pth"
    assert atm.files["vae"].path == "track-vae/atm_libero_grid_atm/303.pth"
    assert tramoe.files["denoiser"].path == "track-generator/libero/tra-moe/latent/ckpt_epoch=1000.pth"
    assert tramoe.files["vae"].path == "track-vae/atm_libero_grid_tramoe/205.pth"
    config = atm.config()
    reference = libero_config("atm")
    assert config.to_dict() == reference.to_dict()  # same architecture, geometry and encoders as the preset
    assert config.image_encoder.model_id == "facebook/dinov2-large"
    assert config.text_encoder.model_id == "openai/clip-vit-large-patch14"
    assert config.latent_scale == list(LIBERO_ATM_LATENT_SCALE)  # from the preset: the registry restates nothing
    assert tramoe.config().latent_scale == list(LIBERO_TRAMOE_LATENT_SCALE)
    listed = yaml.safe_load((REPO / "models" / "registry.yaml").read_text())["models"]
    for key in ("latent_scale", "image_size", "query_grid", "num_frames"):
        assert not any(key in item for item in listed.values()), key
    assert entries["demo-blocks"].local_dir == (REPO / "models" / "demo-blocks").resolve()
    assert not entries["demo-blocks"].is_hub_model


def test_cache_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAJ_FORECAST_HOME", str(tmp_path / "home"))
    assert registry.cache_home() == tmp_path / "home"
    assert registry.model_cache_dir("libero-atm") == tmp_path / "home" / "models" / "libero-atm"
    monkeypatch.delenv("TRAJ_FORECAST_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert registry.cache_home() == tmp_path / "xdg" / "traj_forecast_ros"


def test_resolve_paths_names_and_missing_models(cache_root, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        registry.resolve("libero-atm")
    assert "traj-forecast download libero-atm" in str(info.value) and str(cache_root) in str(info.value)
    with pytest.raises(WeightsNotFoundError, match="known models: .*libero-atm"):
        registry.resolve("no-such-model")
    with pytest.raises(WeightsNotFoundError, match="not found"):
        registry.resolve(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="no config.yaml"):
        registry.resolve(tmp_path / "empty")
    # A converted model in the cache resolves by name.
    config = tiny_config(text=False)
    denoiser, vae = build_modules(config)
    target = registry.model_cache_dir("libero-tramoe")
    save_model_dir(target, config, denoiser, vae)
    assert registry.resolve("libero-tramoe") == target and registry.has_weights(target)
    (target / "vae.safetensors").unlink()
    assert not registry.has_weights(target)


def test_offline_download_fails_fast_with_instructions(cache_root, monkeypatch):
    """Offline mode never touches the network: no hub listing, only local-cache lookups, then instructions."""
    lookups = []

    class NoNetworkApi:
        def model_info(self, *args, **kwargs):
            raise AssertionError("offline mode must not list the hub")

    def local_only(repo_id, filename, **kwargs):
        lookups.append(kwargs.get("local_files_only"))
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{filename} is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetworkApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)
    with pytest.raises(WeightsNotFoundError) as info:
        registry.download("libero-atm")
    assert lookups == [True]  # one local-cache lookup, the first missing file ends it
    message = str(info.value)
    for expected in ("HF_HUB_OFFLINE", "https://huggingface.co/Gabrijel/what-happens-next",
                     "track-generator/libero/atm/latent/ckpt_epoch=1500.pth", "track-vae/atm_libero_grid_atm/303.pth",
                     "facebook/dinov2-large", "openai/clip-vit-large-patch14", "export-official",
                     str(cache_root / "models" / "libero-atm"), "TRAJ_FORECAST_HOME"):
        assert expected in message, expected
    assert not (cache_root / "models" / "libero-atm").exists()


def test_download_without_network_fails_fast(tmp_path):
    """HF_HUB_OFFLINE unset but the hub unreachable (a closed local port): still a quick, instructive failure."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9", "TRAJ_FORECAST_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "traj_forecast_ros.cli", "download", "libero-tramoe"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # a hang guard only
    assert done.returncode == 2, done.stderr
    assert "cannot download model 'libero-tramoe'" in done.stderr
    # the refused connection itself ends the attempt (no retry loop, no timeout waited out)
    assert "track-vae/atm_libero_grid_tramoe/205.pth" in done.stderr and "ConnectError" in done.stderr
    assert "Timeout" not in done.stderr and not (tmp_path / "cache" / "models" / "libero-tramoe").exists()


def _official(module: torch.nn.Module, path: Path) -> None:
    """Write a state dict the way the official trainers do (DDP prefixes inside a checkpoint dict)."""
    state = {f"module.{k}": v for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": state, "epoch": 3}, path)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, cache_root):
    """A registry entry whose 'hub' is a local folder nested under a root prefix, served by faked hub calls."""
    config = tiny_config(text=False)
    config.save_yaml(tmp_path / "tiny.yaml")
    torch.manual_seed(0)
    denoiser, vae = build_modules(config)
    hub = tmp_path / "hub"
    _official(denoiser, hub / "checkpoints-root" / "gen" / "ckpt_epoch=3.pth")
    _official(vae, hub / "checkpoints-root" / "vae" / "7.pth")
    files = {str(p.relative_to(hub)): p for p in hub.rglob("*.pth")}
    sha = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"default": "tiny-hub", "models": {"tiny-hub": {
        "config_file": "tiny.yaml", "hub_repo": "someone/tiny", "files": {
            "denoiser": {"path": "gen/ckpt_epoch=3.pth", "sha256": sha["checkpoints-root/gen/ckpt_epoch=3.pth"]},
            "vae": {"path": "vae/7.pth", "sha256": None}}}}}))
    monkeypatch.setenv("TRAJ_FORECAST_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    listing = [SimpleNamespace(rfilename=name, lfs=SimpleNamespace(sha256=sha[name])) for name in files]
    state = SimpleNamespace(listing=listing, downloads=[])

    class FakeApi:
        def model_info(self, repo_id, **kwargs):
            assert repo_id == "someone/tiny"
            return SimpleNamespace(siblings=state.listing)

    def fake_download(repo_id, filename, **kwargs):
        state.downloads.append(filename)
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return SimpleNamespace(state=state, denoiser=denoiser, vae=vae, files=files)


def test_download_converts_hub_checkpoints_into_a_model_dir(fake_hub, cache_root, shared_images):
    path = registry.download("tiny-hub")
    assert path == cache_root / "models" / "tiny-hub" and registry.has_weights(path)
    assert sorted(fake_hub.state.downloads) == ["checkpoints-root/gen/ckpt_epoch=3.pth", "checkpoints-root/vae/7.pth"]
    source = yaml.safe_load((path / "source.json").read_text())
    assert source["hub_repo"] == "someone/tiny" and len(source["files"]["vae"]["sha256"]) == 64
    assert registry.resolve("tiny-hub") == path
    assert registry.download("tiny-hub") == path and len(fake_hub.state.downloads) == 2  # cached: no new download
    forecaster = Forecaster.from_pretrained("tiny-hub")
    assert forecaster.model_id == "tiny-hub"
    for key, value in fake_hub.vae.state_dict().items():
        torch.testing.assert_close(forecaster.vae.state_dict()[key], value, rtol=0, atol=0)
    result = forecaster.forecast(np.zeros((40, 60, 3), np.uint8), num_samples=1, seed=0)
    assert result.tracks.shape == (1, 4, 8, 8, 2)


def test_download_rejects_a_checksum_mismatch(fake_hub, cache_root):
    fake_hub.state.listing[0].lfs.sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="sha256"):
        registry.download("tiny-hub")
    assert not (cache_root / "models" / "tiny-hub").exists()


def test_download_pins_sha256_and_a_later_load_refuses_changed_files(fake_hub, cache_root):
    """S3: source.json records every converted file's sha256; loading refuses a directory that differs."""
    path = registry.download("tiny-hub")
    source = yaml.safe_load((path / "source.json").read_text())
    pinned = source["sha256"]
    assert {"config.yaml", "denoiser.safetensors", "vae.safetensors"} <= set(pinned)
    assert all(len(digest) == 64 for digest in pinned.values())
    assert "resolved_commit" in source and "image_encoder_commit" in source
    assert registry.resolve("tiny-hub") == path  # untouched: loads

    weights = path / "denoiser.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one flipped bit
    with pytest.raises(CheckpointError, match="denoiser.safetensors"):
        registry.resolve("tiny-hub")
    with pytest.raises(CheckpointError, match="pinned"):
        Forecaster.from_pretrained(str(path))  # a path is checked as well as a name
    weights.write_bytes(original)
    assert registry.resolve("tiny-hub") == path

    (path / "extra.safetensors").write_bytes(b"planted")  # an added file is refused too
    with pytest.raises(CheckpointError, match="extra.safetensors"):
        registry.resolve("tiny-hub")


def test_hub_commit_is_read_from_the_cache_layout():
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert registry.hub_commit_of(f"/hf/models--a--b/snapshots/{commit}/vae/7.pth") == commit
    assert registry.hub_commit_of(f"/hf/models--a--b/snapshots/{commit}") == commit
    assert registry.hub_commit_of("/hf/models--a--b/snapshots/main/vae.pth") is None
    assert registry.hub_commit_of("/tmp/vae.pth") is None


def test_encoder_downloads_use_the_pinned_revision(monkeypatch, tmp_path):
    """S3: encoders were downloaded without a revision; `encoder_revisions` in the registry pins them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"models": {"pinned": {
        "preset": "libero-atm", "hub_repo": "someone/x", "revision": commit,
        "encoder_revisions": {"image_encoder": commit}, "files": {}}}}))
    entry = registry.load_registry(tmp_path / "registry.yaml")["pinned"]
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kwargs: calls.append((repo, kwargs.get("revision"))) or str(tmp_path))
    registry._fetch_encoder("facebook/dinov2-large", entry, tmp_path, "image_encoder")
    registry._fetch_encoder("openai/clip-vit-large-patch14", entry, tmp_path, "text_encoder")
    assert calls == [("facebook/dinov2-large", commit), ("openai/clip-vit-large-patch14", None)]


def test_registry_entries_refer_to_a_preset_and_restate_nothing(tmp_path):
    """A registry entry names its architecture by preset; restated sizes or a latent scale are refused, not
    silently ignored, and an entry may replace the preset's encoder ids."""
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": {"mine": {"preset": "libero-tramoe", "hub_repo": "someone/x",
                                                        "image_encoder": "/models/dino", "files": {}}}}))
    config = registry.load_registry(path)["mine"].config()
    assert config.name == "mine" and config.image_encoder.model_id == "/models/dino"
    assert config.latent_scale == list(LIBERO_TRAMOE_LATENT_SCALE) and config.query_grid == (64, 64)
    path.write_text(yaml.safe_dump({"models": {"mine": {"preset": "libero-atm", "latent_scale": [1.0] * 8}}}))
    with pytest.raises(ValueError, match=r"unknown keys \['latent_scale'\]"):
        registry.load_registry(path)


def _age_files(model_dir: Path, seconds: float = 3600.0) -> None:
    """Give every file an mtime ``seconds`` in the past (outside the racy window of a fresh stat record)."""
    past = time.time_ns() - int(seconds * 1e9)
    for path in model_dir.rglob("*"):
        if path.is_file() and path.name != registry.SOURCE_FILE:
            os.utime(path, ns=(past, past))


def test_resolve_rehashes_only_files_whose_size_or_mtime_changed(fake_hub, cache_root, monkeypatch):
    """The pinned sha256 is re-checked by (size, mtime_ns): unchanged files are not hashed on every resolve."""
    path = registry.download("tiny-hub")
    source = yaml.safe_load((path / "source.json").read_text())
    assert set(source["stat"]["files"]) == set(source["sha256"])
    hashed = []
    real_sha256 = registry.sha256_of
    monkeypatch.setattr(registry, "sha256_of", lambda file, *a, **k: hashed.append(Path(file).name)
                        or real_sha256(file, *a, **k))
    registry.resolve("tiny-hub")  # just written: inside the racy window, so hashed
    assert len(hashed) == len(source["sha256"])

    _age_files(path)  # mtimes moved: hashed once more, then the record is refreshed
    hashed.clear()
    registry.resolve("tiny-hub")
    assert len(hashed) == len(source["sha256"])
    hashed.clear()
    assert registry.resolve("tiny-hub") == path and registry.resolve(str(path)) == path
    assert hashed == []  # unchanged (size, mtime): nothing re-hashed

    weights = path / "denoiser.safetensors"
    original, info = weights.read_bytes(), weights.stat()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, new mtime: hashed and refused
    with pytest.raises(CheckpointError, match="denoiser.safetensors"):
        registry.resolve("tiny-hub")
    assert hashed == ["denoiser.safetensors"]
    weights.write_bytes(original[:-7])  # another size, the recorded mtime restored: refused without hashing
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    hashed.clear()
    with pytest.raises(CheckpointError, match="denoiser.safetensors"):
        registry.resolve("tiny-hub")
    assert hashed == []
    weights.write_bytes(original)
    assert registry.resolve("tiny-hub") == path


def test_a_file_changed_while_others_are_hashed_is_not_recorded_as_verified(fake_hub, cache_root, monkeypatch):
    """A pinned file rewritten in place (same size, an older-looking mtime) after its own hash but while later files
    are still being hashed must be hashed again on the next resolve, and refused."""
    path = registry.download("tiny-hub")
    _age_files(path)  # every file is re-hashed on the next resolve
    order = list(yaml.safe_load((path / "source.json").read_text())["sha256"])  # the order files are hashed in
    victim = next(name for name in order if name.endswith(".safetensors"))
    assert order.index(victim) < len(order) - 1  # a file is hashed after it
    first, last = path / victim, path / order[-1]
    real_sha256 = registry.sha256_of

    def hash_and_tamper(file, *args, **kwargs):
        if Path(file) == last:  # the first file was verified a moment ago: rewrite it now
            data = first.read_bytes()
            first.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
            past = time.time_ns() - 600 * 10**9
            os.utime(first, ns=(past, past))
        return real_sha256(file, *args, **kwargs)

    monkeypatch.setattr(registry, "sha256_of", hash_and_tamper)
    assert registry.resolve("tiny-hub") == path  # verified as each file was when it was hashed
    monkeypatch.setattr(registry, "sha256_of", real_sha256)
    with pytest.raises(CheckpointError, match=victim.replace(".", "\\.")):
        registry.resolve("tiny-hub")


def test_model_choice_falls_back_past_a_corrupt_model_with_the_reason_logged(cache_root, monkeypatch, caplog):
    from traj_forecast_ros.bag import model_choice

    libero = registry.model_cache_dir(model_choice.LIBERO_MODEL)
    config = tiny_config(text=False)
    save_model_dir(libero, config, *build_modules(config))
    (libero / registry.SOURCE_FILE).write_text('{"sha256": {"config.yaml": "' + "0" * 64 + '"}}')
    monkeypatch.setattr(model_choice, "_cuda_available", lambda: True)
    with caplog.at_level("WARNING", logger="traj_forecast_ros.bag.model_choice"):
        name, _why = model_choice.best_offline_model()
    assert name == model_choice.SIM_MODEL  # LIBERO with a GPU would win, but its files differ from the pins
    assert any("libero-atm" in record.getMessage() and "pinned" in record.getMessage() for record in caplog.records)
