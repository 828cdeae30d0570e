"""`traj-forecast evaluate` where the motion is: the moving-region figures per method and the paired-instruction
test on a tiny dataset whose branch groups hold one image pushed left and right (tiny_sim_data)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_sim_data import INSTRUCTIONS, write_tiny_sim
from traj_forecast_ros.data.dataset import TrajectoryDataset
from traj_forecast_ros.model.checkpoint import load_model_dir
from traj_forecast_ros.train import evaluate as evaluate_module
from traj_forecast_ros.train.data import build_text_encoder


@pytest.fixture(scope="module")
def branch_data(tmp_path_factory) -> Path:
    """3 branch groups (scenes) x 2 samples: one image, the cube pushed left / right."""
    return write_tiny_sim(tmp_path_factory.mktemp("paired") / "data", scenes=3, branch_groups=True)


@pytest.fixture(scope="module")
def blind_model(tmp_path_factory) -> Path:
    """A tiny-sim model with random weights: its untrained word encoder maps both instructions alike."""
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.checkpoint import save_model_dir
    from traj_forecast_ros.model.presets import preset_config

    model = Forecaster.from_config(preset_config("tiny-sim"), seed=0)
    directory = tmp_path_factory.mktemp("paired") / "blind"
    save_model_dir(directory, model.config, model.denoiser, model.vae, model.image_encoder, model.text_encoder)
    return directory


def oracle_predictions(follows_instruction: bool):
    """A stand-in for ``forecaster_predictions``: each scene's K samples are the true future of the group member
    with the requested instruction (``follows_instruction``) or always the scene's own (instruction-blind)."""

    def predict(model, dataset, indices, num_samples, seed=0, steps=10, sample_batch_size="auto", device="auto",
                dtype="auto", progress=False, instructions=None, guidance_scale=None):
        scene_ids = dataset.load("scene_ids")
        names = [dataset.meta.instructions[int(i)] for i in dataset.load("instructions")]
        out = []
        for index, instruction in zip(indices, instructions):
            chosen = int(index)
            if follows_instruction:
                chosen = next(i for i in range(len(dataset))
                              if scene_ids[i] == scene_ids[index] and names[i] == instruction)
            out.append(np.repeat(dataset.gather("tracks", [chosen])[:, 0], num_samples, axis=0))
        return np.stack(out)

    return predict


@pytest.mark.parametrize("follows, ratio, wins", [(True, 0.0, 1.0), (False, None, 0.0)])
def test_paired_test_of_hand_made_forecasters(branch_data, monkeypatch, follows, ratio, wins):
    """An oracle that follows the instruction: matched error 0, crossed error the other push, so the ratio is 0 and
    the right instruction always wins. One that ignores it: crossed is its own truth (error 0), matched too."""
    monkeypatch.setattr(evaluate_module, "forecaster_predictions", oracle_predictions(follows))
    monkeypatch.setattr(evaluate_module, "sampling_defaults", lambda model, steps, guidance: (10, 1.0, True))
    report = json.loads(json.dumps(evaluate_module.evaluate(branch_data, model="oracle", num_samples=2)))
    paired = report["paired_instructions"]
    assert paired["paired_cases"] == 6 and paired["paired_groups"] == 3  # (left, right) and (right, left) x 3
    assert paired["paired_right_instruction_wins"] == wins
    assert paired["paired_distinct_cases"] == 6  # a push left and a push right part by far more than 5 px
    assert paired["paired_distinct_right_instruction_wins"] == wins
    assert paired["paired_instruction_alignment"] == pytest.approx(1.0 if follows else 0.0)  # the truths' parting
    if follows:
        assert paired["paired_matched_moving_mse"] == 0.0 and paired["paired_crossed_moving_mse"] > 100.0
        assert paired["paired_matched_crossed_ratio"] == ratio
    ours = report["results"]["ours"]
    assert ours["moving_best_of_k_mse"] == 0.0 and ours["calibration_best_sample"] == pytest.approx(1.0)


def test_paired_test_runs_the_crossed_forecasts_with_the_same_noise(branch_data, blind_model):
    """A real (random) model that ignores the instruction: with the same noise the crossed forecast is the
    matched one exactly, so the ratio is exactly 1 and the right instruction never wins; the moving-region figures
    are reported for every method, and zero motion calibrates to 0. A cut group (max_scenes) has no pair."""
    report = evaluate_module.evaluate(branch_data, model=str(blind_model), num_samples=2, steps=3, device="cpu")
    paired = report["paired_instructions"]
    assert paired["paired_cases"] == 6
    assert paired["paired_matched_crossed_ratio"] == 1.0 and paired["paired_right_instruction_wins"] == 0.0
    assert paired["paired_instruction_response"] == 0.0 and paired["paired_truth_gap_px"] > 5.0
    assert report["seconds"]["ours_crossed_instructions"] > 0
    zero = report["results"]["zero_motion"]
    dataset = TrajectoryDataset(branch_data)
    truth = dataset.load("tracks")[:, 0]  # [N, T, Hq, Wq, 2]
    moving = np.linalg.norm(truth - truth[:, :1], axis=-1).max(axis=1) > 5.0  # [N, Hq, Wq]: the cube's points
    assert zero["moving_points"] == moving.sum() > 0 and zero["calibration_best_sample"] == 0.0
    assert zero["moving_best_of_k_ade_px"] == pytest.approx(np.mean([0.0, 6.0, 12.0, 18.0]))  # 6 px per frame
    for method in ("ours", "zero_motion"):
        assert {"moving_best_of_k_mse", "moving_best_of_k_fde_px", "calibration_sample_mean"} <= set(
            report["results"][method])
    table = evaluate_module.format_table(report)
    assert table.splitlines()[0].startswith("| method | moving best-of-K MSE (px^2) |")
    assert "right instruction wins 0%" in evaluate_module.format_paired(report)
    cut = evaluate_module.evaluate(branch_data, model=str(blind_model), num_samples=1, steps=2, device="cpu",
                                   max_scenes=3)
    assert cut["paired_instructions"]["paired_cases"] == 2  # the third sample's partner is not evaluated
    instructionless = evaluate_module.evaluate(branch_data, model=str(blind_model), num_samples=1, steps=2,
                                               device="cpu", use_instructions=False)
    assert instructionless["paired_instructions"] is None
    assert dataset[1].branch_group == 0 and dataset[1].instruction == INSTRUCTIONS[1]


def test_instruction_probe_measures_the_futures_and_the_forecasts(branch_data, blind_model, tmp_path):
    """bench/instruction_probe.py: the left / right pushes of each group part (6 ordered pairs); the untrained
    model's forecasts do not move at all between the two instructions (zero-initialised text path) but do between
    two noise seeds, and its denoiser's flow error is the same under either instruction."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "instruction_probe.py"
    spec = importlib.util.spec_from_file_location("instruction_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    assert probe.main(["--model", str(blind_model), "--data", str(branch_data), "--groups", "2", "--samples", "2",
                       "--flow-pairs", "3", "--flow-times", "0,0.5", "--embedding-pairs", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # one pair of instructions (left / right) in every group: its embeddings' cosine, as the model's encoder gives it
    left, right = sorted(set(INSTRUCTIONS[:2]))
    config = load_model_dir(blind_model)[0]
    with torch.no_grad():
        embedded = torch.nn.functional.normalize(build_text_encoder(config, model_dir=blind_model)(
            [left, right]).float(), dim=-1)
    cosine = float(embedded[0] @ embedded[1])
    assert report["embeddings"]["pairs"] == 1 and report["embeddings"]["closest"][0]["instructions"] == [left, right]
    assert report["embeddings"]["cosine_mean"] == pytest.approx(cosine) == report["embeddings"]["cosine_max"]
    assert report["pairs"] == 6 and report["share_parting_over_5_px"] == 1.0
    assert report["future_mse_median_px2"] > 100.0 and report["share_under_20_px2"] == 0.0
    assert len(report["sensitivity"]) == 2  # one pair per group, two groups asked for
    for row in report["sensitivity"]:
        assert row["instruction_effect_px"] == 0.0 and row["seed_effect_px"] > 0.0
    assert sorted(report["flow_gap"]) == ["0", "0.5"]
    assert report["flow_future_gap"]["pairs"] == 3 and report["flow_future_gap"]["latent_gap_mean"] > 0
    for gap in report["flow_gap"].values():
        assert gap["pairs"] == 3 and gap["own_error"] > 0 and gap["own_error"] == gap["partner_error"]
        assert gap["own_lower_share"] == 0.0 and gap["velocity_gap"] == 0.0
