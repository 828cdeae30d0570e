"""End to end through the CLI on a tiny set: data generate/info/import, train vae/flow/regressor, evaluate."""

import json

import numpy as np
import pytest

from traj_forecast_ros.cli import main


def test_generate_train_and_evaluate_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    quick = ["--steps", "2", "--batch-size", "4", "--log-every", "1", "--no-progress", "--device", "cpu",
             "--threads", "1"]
    assert main(["data", "generate", "--out", str(data), "--scenes", "6", "--seed", "1", "--rollouts", "2",
                 "--config", "tiny-blocks", "--kinds", "fall,rest,slide"]) == 0
    assert main(["data", "info", str(data)]) == 0
    assert "6 scenes x 2 rollouts" in capsys.readouterr().out

    assert main(["train", "vae", "--data", str(data), "--out", str(tmp_path / "vae"), "--config", "tiny-blocks",
                 *quick]) == 0
    assert main(["train", "flow", "--data", str(data), "--vae", str(tmp_path / "vae"), "--out",
                 str(tmp_path / "flow"), "--ema-decay", "0.9", "--latent-draw", "mean", *quick]) == 0
    assert "latent_draw: mean" in (tmp_path / "flow" / "config.yaml").read_text()
    assert main(["train", "regressor", "--data", str(data), "--encoder", str(tmp_path / "vae"), "--out",
                 str(tmp_path / "regressor"), *quick]) == 0
    capsys.readouterr()

    report_path = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(tmp_path / "flow"), "--data", str(data), "--regressor",
                 str(tmp_path / "regressor"), "--samples", "3", "--out", str(report_path), "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert "| ours |" in printed and "| zero_motion |" in printed and "| regressor |" in printed
    report = json.loads(report_path.read_text())
    assert report["scenes"] == 6 and report["samples"] == 3 and report["rollouts"] == 2
    for method in ("ours", "zero_motion", "regressor"):
        values = report["results"][method]
        for key in ("best_of_k_mse", "mean_of_k_mse", "fvmd", "lrtl", "diversity", "static_mean_displacement"):
            assert key in values
        assert values["best_of_k_mse"] <= values["mean_of_k_mse"] + 1e-9
    assert report["results"]["zero_motion"]["diversity"] == 0.0
    assert report["results"]["zero_motion"]["static_mean_displacement"] == 0.0
    assert set(report["per_kind"]) == {"fall", "rest", "slide"}


def test_import_tracker_output(tmp_path, capsys):
    from traj_forecast_ros.data.dataset import TrajectoryDataset
    from traj_forecast_ros.model.presets import tiny_blocks_config

    config = tiny_blocks_config()
    rows, cols = config.query_grid
    ys, xs = np.meshgrid(config.query_offset + config.query_stride * np.arange(rows),
                         config.query_offset + config.query_stride * np.arange(cols), indexing="ij")
    grid = np.stack([xs, ys], -1).reshape(-1, 2)  # [P, 2] row-major
    tracks = np.repeat(grid[None, None], config.num_frames, axis=1).repeat(3, axis=0)  # [N, T, P, 2] (CoTracker)
    tracks[:, :, :, 0] += np.arange(config.num_frames)[None, :, None]  # everything drifts right 1 px / frame
    np.save(tmp_path / "images.npy", np.zeros((3, 128, 128, 3), np.uint8))
    np.save(tmp_path / "tracks.npy", tracks.astype(np.float32))
    assert main(["data", "import", "--images", str(tmp_path / "images.npy"), "--tracks", str(tmp_path / "tracks.npy"),
                 "--layout", "tpc", "--config", "tiny-blocks", "--out", str(tmp_path / "user")]) == 0
    sample = TrajectoryDataset(tmp_path / "user")[2]
    assert sample.tracks.shape == (1, config.num_frames, rows, cols, 2)
    np.testing.assert_allclose(sample.tracks[0, -1, 0, 0], grid[0] + [config.num_frames - 1, 0])
    with pytest.raises(SystemExit):
        main(["data", "generate", "--out", str(tmp_path / "x"), "--scenes", "1", "--kinds", "explode"])


def test_train_vae_config_choice_with_init(tmp_path, monkeypatch):
    """An explicit --config wins over --init DIR's config.yaml (even when it names the default preset); without
    --config the init directory's config is used, and without either the demo-blocks preset."""
    import traj_forecast_ros.commands.train as train_command  # the train_vae the command calls
    from traj_forecast_ros.model.presets import tiny_blocks_config

    init = tmp_path / "init"
    init.mkdir()
    tiny_blocks_config().save_yaml(init / "config.yaml")
    seen = []
    monkeypatch.setattr(train_command, "train_vae", lambda data, out, config, settings, **kw: seen.append(config) or {})
    common = ["train", "vae", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*common, "--config", "demo-blocks", "--init", str(init)]) == 0
    assert main([*common, "--init", str(init)]) == 0
    assert main(common) == 0
    assert [config.name for config in seen] == ["demo-blocks", "tiny-blocks", "demo-blocks"]


def test_train_vae_passes_the_decoder_fine_tune_options(tmp_path, monkeypatch):
    """--decoder-only, --recon-delta, --latent-noise, --latent-noise-still-only and --moving-weight reach train_vae;
    their defaults are the official recipe."""
    import traj_forecast_ros.commands.train as train_command  # the train_vae the command calls

    seen = []
    monkeypatch.setattr(train_command, "train_vae", lambda data, out, config, settings, **kw: seen.append(kw) or {})
    common = ["train", "vae", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(common) == 0
    assert main([*common, "--init", str(tmp_path), "--decoder-only", "--recon-delta", "0.01",
                 "--latent-noise", "0.1", "--latent-noise-still-only", "--moving-weight", "4"]) == 0
    assert [(kw["decoder_only"], kw["recon_delta"], kw["latent_noise"], kw["noise_still_tokens_only"],
             kw["moving_weight"]) for kw in seen] == [(False, 1.0, 0.0, False, 0.0), (True, 0.01, 0.1, True, 4.0)]


def test_train_flow_passes_the_moving_weight_text_context_and_contrast(tmp_path, monkeypatch):
    """--moving-weight, --text-context, --time-mean, --instruction-contrast, --contrast-on-motion, --crossed-still,
    --text-grounding, --word-bag and --contrast-temperature reach train_flow; by default every token weighs the same,
    the instruction only enters with the timestep (the paper's path), the flow time is the official logit-normal and
    there is no contrast."""
    import traj_forecast_ros.commands.train as train_command  # the train_flow the command calls

    seen = []
    monkeypatch.setattr(train_command, "train_flow", lambda data, out, settings, **kw: seen.append(kw) or {})
    common = ["train", "flow", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(common) == 0
    assert main([*common, "--init", str(tmp_path), "--moving-weight", "3", "--text-context", "--time-mean", "-0.5",
                 "--instruction-contrast", "0.1", "--contrast-on-motion", "--crossed-still", "2", "--text-grounding",
                 "--word-bag", "--contrast-temperature", "0.1"]) == 0
    assert [(kw["moving_weight"], kw["text_context"], kw["time_mean"], kw["instruction_contrast"],
             kw["contrast_on_motion"], kw["crossed_still"], kw["text_grounding"], kw["word_bag"],
             kw["contrast_temperature"])
            for kw in seen] == [(0.0, False, 0.0, 0.0, False, 0.0, False, False, 0.01),
                                (3.0, True, -0.5, 0.1, True, 2.0, True, True, 0.1)]
