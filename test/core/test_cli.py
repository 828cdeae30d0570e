"""CLI: predict end to end on a tiny model directory, info, export-official, offline download."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from traj_forecast_ros.cli import build_parser, main
from traj_forecast_ros.commands import COMMANDS
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.model.presets import tiny_config


def read_npz(path: Path) -> dict:
    """The arrays of a ``predict`` output file, with its JSON ``metadata`` decoded (no pickles allowed)."""
    with np.load(path, allow_pickle=False) as data:
        saved = {key: data[key] for key in data.files}
    saved["metadata"] = json.loads(str(saved["metadata"]))
    return saved


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from traj_forecast_ros.model.checkpoint import save_model_dir

    model = Forecaster.from_config(tiny_config(), seed=0)
    directory = tmp_path_factory.mktemp("models") / "tiny"
    save_model_dir(directory, model.config, model.denoiser, model.vae, model.image_encoder, model.text_encoder)
    return directory


def test_predict_writes_tracks_and_a_still(tiny_model_dir, shared_images, tmp_path, capsys):
    image_path = shared_images / "physics101_1.jpg"
    out, viz = tmp_path / "out" / "tracks.npz", tmp_path / "overlay.png"
    code = main(["predict", str(image_path), "--model", str(tiny_model_dir), "--instruction", "push the cart",
                 "--samples", "3", "--steps", "4", "--seed", "7", "--device", "cpu", "--out", str(out),
                 "--viz", str(viz), "--viz-stride", "1"])
    assert code == 0, capsys.readouterr().err
    assert "tiny: 3 samples" in capsys.readouterr().out
    saved = read_npz(out)
    metadata = saved["metadata"]
    assert set(saved) == {"tracks", "query_points", "image_size", "frame_interval", "crop_box", "metadata"}
    assert float(saved["frame_interval"]) == 0.0  # the tiny preset states no frame interval (0 = unknown)
    np.testing.assert_array_equal(saved["crop_box"], [104, 0, 360, 256])  # the centre square of a 464 x 256 image
    assert saved["tracks"].shape == (3, 4, 8, 8, 2) and saved["tracks"].dtype == np.float32
    assert saved["query_points"].shape == (8, 8, 2)
    assert tuple(saved["image_size"]) == (256, 464) and metadata["seed"] == 7
    assert metadata["instruction"] == "push the cart" and metadata["model_id"] == "tiny"
    assert metadata["dtype"] == "float32" and metadata["device"] == "cpu" and "denoise" in metadata["timings"]
    assert np.isfinite(saved["tracks"]).all()
    # Same model, same seed through the Python API -> identical tracks.
    api = Forecaster.from_pretrained(tiny_model_dir, device="cpu")
    image = np.asarray(Image.open(image_path).convert("RGB"))
    expected = api.forecast(image, "push the cart", num_samples=3, steps=4, seed=7).tracks
    np.testing.assert_array_equal(saved["tracks"], expected)
    for sample in range(3):  # frame 0 exactly at the query points
        np.testing.assert_array_equal(saved["tracks"][sample, 0], saved["query_points"])
    drawn = np.asarray(Image.open(viz).convert("RGB"))
    assert drawn.shape == image.shape
    assert np.any(drawn != image)  # tracks painted over the image


def test_predict_raw_writes_the_decoder_output(tiny_model_dir, shared_images, tmp_path):
    """``--raw``: the tracks as decoded (frame 0 only near the query points), the same as ``anchor=False``."""
    image_path = shared_images / "physics101_1.jpg"
    out = tmp_path / "raw.npz"
    assert main(["predict", str(image_path), "--model", str(tiny_model_dir), "--samples", "2", "--steps", "3",
                 "--seed", "4", "--device", "cpu", "--raw", "--out", str(out)]) == 0
    saved = read_npz(out)
    api = Forecaster.from_pretrained(tiny_model_dir, device="cpu")
    image = np.asarray(Image.open(image_path).convert("RGB"))
    raw = api.forecast(image, num_samples=2, steps=3, seed=4, anchor=False)
    np.testing.assert_array_equal(saved["tracks"], raw.tracks)
    assert np.abs(saved["tracks"][:, 0] - saved["query_points"]).max() > 1e-3


def test_predict_gif_and_mono_input(tiny_model_dir, tmp_path):
    mono = tmp_path / "mono.png"
    Image.fromarray(np.tile(np.arange(0, 200, 2, dtype=np.uint8), (60, 1))).save(mono)  # 60x100 grey ramp
    out, viz = tmp_path / "mono.npz", tmp_path / "anim.gif"
    assert main(["predict", str(mono), "--model", str(tiny_model_dir), "--samples", "1", "--steps", "3",
                 "--seed", "1", "--out", str(out), "--viz", str(viz)]) == 0
    with Image.open(viz) as gif:
        assert gif.size == (100, 60) and gif.n_frames >= 2
    tracks = read_npz(out)["tracks"]
    assert tracks.shape == (1, 4, 8, 8, 2)


def test_predict_reports_bad_input_clearly(tiny_model_dir, tmp_path, capsys):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    assert main(["predict", str(not_an_image), "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.npz")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    assert main(["predict", str(image), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float16",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "float16 on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_info_on_a_model_dir_and_the_registry(tiny_model_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRAJ_FORECAST_HOME", str(tmp_path / "cache"))
    assert main(["info", str(tiny_model_dir), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["weights_present"] is True
    assert description["config"]["query_grid"] == [8, 8] and description["config"]["text_conditioned"] is True
    assert description["parameters"]["denoiser"] > 0 and "vae.safetensors" in description["files"]
    assert description["image_encoder"] == "shipped in image_encoder/"
    assert main(["info", "libero-atm", "--json"]) == 0
    libero = json.loads(capsys.readouterr().out)
    assert libero["weights_present"] is False
    assert libero["parameters"] == {"denoiser": 43_522_184, "vae": 58_580_272}  # spec section 6
    assert "NOT downloaded" in libero["image_encoder"]
    assert main(["info"]) == 0
    listing = capsys.readouterr().out
    assert "libero-atm" in listing and "not downloaded" in listing
    assert main(["info", "nothing-like-this"]) == 2


def test_export_official_from_pth(tmp_path, capsys, shared_images):
    config = tiny_config(text=False)
    config.save_yaml(tmp_path / "tiny.yaml")
    model = Forecaster.from_config(config, seed=4)
    for name, module in (("den.pth", model.denoiser), ("vae.pth", model.vae)):
        torch.save({"model_state_dict": {f"module._orig_mod.{k}": v for k, v in module.state_dict().items()}},
                   tmp_path / name)
    out = tmp_path / "exported"
    code = main(["export-official", "--denoiser", str(tmp_path / "den.pth"), "--vae", str(tmp_path / "vae.pth"),
                 "--config", str(tmp_path / "tiny.yaml"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "denoiser.safetensors").is_file() and (out / "vae.safetensors").is_file()
    loaded = Forecaster.from_pretrained(out)
    for key, value in model.denoiser.state_dict().items():
        torch.testing.assert_close(loaded.denoiser.state_dict()[key], value, rtol=0, atol=0)
    # The wrong preset for these files is refused with the key listing.
    assert main(["export-official", "--denoiser", str(tmp_path / "den.pth"), "--vae", str(tmp_path / "vae.pth"),
                 "--preset", "libero-atm", "--out", str(tmp_path / "bad")]) == 2
    assert "does not match" in capsys.readouterr().err


def test_download_offline_via_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRAJ_FORECAST_HOME", str(tmp_path / "cache"))
    assert main(["download", "libero-atm"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "ckpt_epoch=1500.pth" in err


def _commands(parser, path=()):
    """``(command path, parser)`` for every command and subcommand of the CLI."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_every_option_is_spelled_one_way_across_all_commands():
    """One spelling per option (no aliases), one option per meaning: K is ``--samples`` everywhere."""
    from traj_forecast_ros.cli import build_parser
    from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES

    spellings = {}  # dest -> option strings seen
    commands = dict(_commands(build_parser()))
    for path, parser in commands.items():
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if not longs or action.dest == "help":
                continue
            assert len(longs) == 1, f"{' '.join(path)}: {longs} spell one option several ways"
            spellings.setdefault(action.dest, set()).add(longs[0])
    assert {dest: s for dest, s in spellings.items() if len(s) > 1} == {}
    assert not any(opt in ("--num-samples", "--topics", "--sample-batch") for s in spellings.values() for opt in s)
    for path in (("predict",), ("evaluate",), ("bag", "run")):
        options = {a.dest: a for a in commands[path]._actions}
        assert options["samples"].option_strings == ["--samples"] and options["steps"].option_strings == ["--steps"]
    assert {a.dest: a.default for a in commands[("predict",)]._actions}["samples"] == DEFAULT_NUM_SAMPLES
    for path in (("predict",), ("evaluate",)):  # steps and guidance default to the model's own settings
        defaults = {a.dest: a.default for a in commands[path]._actions}
        assert defaults["steps"] is None and defaults["guidance_scale"] is None


def test_data_workers_default_to_the_cores_available_not_the_cpu_count(monkeypatch):
    """`data sim-manipulation --workers` unset: the cores this process may use (affinity, cgroup quota)."""
    from traj_forecast_ros import cpu_cores
    from traj_forecast_ros.commands.data import default_workers

    monkeypatch.setattr(cpu_cores, "available_cores", lambda: 3)
    assert default_workers(None) == 3
    assert default_workers(5) == 5
    with pytest.raises(SystemExit, match="at least 1"):
        default_workers(0)


_MODULES_LOADED = """
import json, sys
from traj_forecast_ros.cli import main

report = {}
for argv in (["--help"], ["data", "--help"]):
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code
    report[" ".join(argv)] = {"code": code, "loaded": sorted(
        name for name in sys.modules if name.startswith("traj_forecast_ros.commands.") or name in ("torch", "rclpy"))}
print(json.dumps(report))
"""


def test_help_lists_every_command_and_imports_only_the_command_being_run():
    """``traj-forecast --help`` loads no command module (no torch, no rclpy); ``data --help`` loads ``data`` only."""
    result = subprocess.run([sys.executable, "-c", _MODULES_LOADED], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    *help_lines, last = result.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["--help"] == {"code": 0, "loaded": []}
    top_help = " ".join(" ".join(help_lines).split())
    for command in COMMANDS:
        assert f"{command.name} {command.help}" in top_help, command.name
    assert report["data --help"]["code"] == 0
    assert [name for name in report["data --help"]["loaded"] if name.startswith("traj_forecast_ros")] == [
        "traj_forecast_ros.commands.data"]
    assert "rclpy" not in report["data --help"]["loaded"]


def test_the_registry_names_each_modules_commands_with_their_help():
    """Each command module's ``register`` adds exactly the commands ``COMMANDS`` gives it, with the table's help; the
    full parser of one command is the same whether it is built alone or with all the others."""
    for module_name in dict.fromkeys(command.module for command in COMMANDS):
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module_name).register(subparsers)
        assert list(subparsers.choices) == [c.name for c in COMMANDS if c.module == module_name], module_name
        helps = {action.dest: action.help for action in subparsers._choices_actions}
        assert helps == {c.name: c.help for c in COMMANDS if c.module == module_name}
    everything = dict(_commands(build_parser()))
    alone = dict(_commands(build_parser(["evaluate"])))
    assert [path for path in everything if len(path) == 1] == [(c.name,) for c in COMMANDS]
    assert [a.dest for a in alone[("evaluate",)]._actions] == [a.dest for a in everything[("evaluate",)]._actions]
    assert [a.dest for a in alone[("predict",)]._actions] == ["help"]  # listed, not loaded
