"""The sim-manipulation pipeline at test size, without robosuite (a tiny labelled dataset built here):
encoder pretraining, both stages (and the decoder-only fine-tune between them) with the words text encoder,
forecasting with an instruction, evaluation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_sim_data import INSTRUCTIONS, VIEWS, quick_settings, write_tiny_sim
from traj_forecast_ros.errors import DatasetError
from traj_forecast_ros.model.presets import preset_config
from traj_forecast_ros.train.figure import HEADER_PX


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory):
    return write_tiny_sim(tmp_path_factory.mktemp("sim") / "data", scenes=6)


@pytest.fixture(scope="module")
def encoder_run(sim_data, tmp_path_factory):
    from traj_forecast_ros.train.encoder import train_encoder

    out = tmp_path_factory.mktemp("sim") / "encoder"
    train_encoder(sim_data, out, preset_config("tiny-sim"), quick_settings(steps=24, lr=3e-3, batch_size=6))
    return out


@pytest.fixture(scope="module")
def model_run(sim_data, encoder_run, tmp_path_factory):
    from traj_forecast_ros.train.flow import train_flow
    from traj_forecast_ros.train.vae import train_vae

    root = tmp_path_factory.mktemp("sim")
    train_vae(sim_data, root / "vae", preset_config("tiny-sim"), quick_settings(steps=4), encoder_dir=encoder_run)
    # as scripts/train_sim.sh: the decoder fine-tuned alone, then the flow on the (unchanged) latents
    train_vae(sim_data, root / "vae_decoder", preset_config("tiny-sim"), quick_settings(steps=2), init=root / "vae",
              decoder_only=True, recon_delta=0.01, latent_noise=0.1)
    train_flow(sim_data, root / "flow", quick_settings(steps=4), vae_dir=root / "vae_decoder", latent_draw="mean")
    return root


def test_encoder_pretraining_loss_falls_and_the_encoder_loads_frozen(sim_data, encoder_run, read_metrics):
    from traj_forecast_ros.train.data import build_image_encoder, encoder_fingerprint
    from traj_forecast_ros.train.encoder import evaluate_dense

    rows = read_metrics(encoder_run / "metrics.csv")
    assert len(rows) == 24
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    assert rows[-1]["depth_l1_m"] < rows[0]["depth_l1_m"]

    config = preset_config("tiny-sim")
    encoder = build_image_encoder(config, model_dir=encoder_run)
    random = build_image_encoder(config)  # what the VAE would freeze without --encoder
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    images = torch.from_numpy(np.stack([sim_data_image(sim_data, i) for i in range(3)]))
    with torch.no_grad():
        tokens = encoder(images)
    assert tokens.shape == (3, config.vae.num_frame_tokens, config.vae.frame_features_dim)
    assert encoder_fingerprint(encoder, config.image_size) != encoder_fingerprint(random, config.image_size)
    named = preset_config("tiny-sim")  # a config can select the pretrained encoder by its folder
    named.image_encoder.model_id = str(encoder_run / "image_encoder")
    assert encoder_fingerprint(build_image_encoder(named), config.image_size) == encoder_fingerprint(
        encoder, config.image_size)
    assert (encoder_run / "image_encoder" / "model.safetensors").is_file()
    scores = evaluate_dense(encoder_run, sim_data)
    assert 0.0 <= scores["segmentation_miou"] <= scores["segmentation_acc"] <= 1.0
    assert scores["depth_l1_m"] < 1.0


def sim_data_image(root, index):
    from traj_forecast_ros.data.dataset import TrajectoryDataset

    return TrajectoryDataset(root)[index].image


def test_probe_of_the_random_encoder_keeps_the_backbone(sim_data, tmp_path, make_settings):
    from traj_forecast_ros.train.data import build_image_encoder
    from traj_forecast_ros.train.encoder import train_encoder

    config = preset_config("tiny-sim")
    train_encoder(sim_data, tmp_path / "probe", config, make_settings(steps=2), frozen_backbone=True)
    trained = build_image_encoder(config, model_dir=tmp_path / "probe").state_dict()
    random = build_image_encoder(config).state_dict()
    assert all(torch.equal(trained[k], random[k]) for k in random)


def test_encoder_pretraining_refuses_unlabelled_data(tmp_path, tiny_data, make_settings):
    from traj_forecast_ros.train.encoder import train_encoder

    with pytest.raises(DatasetError, match="dense labels"):
        train_encoder(tiny_data, tmp_path / "x", preset_config("tiny-blocks"), make_settings(steps=1))


def test_vae_refuses_an_encoder_of_another_architecture(sim_data, tmp_path, make_settings, encoder_run):
    from traj_forecast_ros.train.vae import train_vae

    config = preset_config("tiny-sim")
    config.vae.frame_features_dim = 48
    with pytest.raises(ValueError, match="image encoder gives"):
        train_vae(sim_data, tmp_path / "vae", config, make_settings(steps=1), encoder_dir=encoder_run)


def test_trained_model_forecasts_with_an_instruction(sim_data, encoder_run, model_run):
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.word_encoder import WordTextEncoder
    from traj_forecast_ros.train.data import build_image_encoder

    flow = model_run / "flow"
    config_text = (flow / "config.yaml").read_text()
    assert "kind: words" in config_text and "- zzz" not in config_text
    forecaster = Forecaster.from_pretrained(str(flow), device="cpu")
    assert isinstance(forecaster.text_encoder, WordTextEncoder)
    assert forecaster.text_encoder.vocabulary.tokens[2:] == sorted({w for s in INSTRUCTIONS for w in s.split()})
    # the frozen encoder of the model is the pretrained one
    pretrained = build_image_encoder(preset_config("tiny-sim"), model_dir=encoder_run).state_dict()
    assert all(torch.equal(forecaster.image_encoder.state_dict()[k], v) for k, v in pretrained.items())

    image = sim_data_image(sim_data, 0)
    left = forecaster.forecast(image, instruction=INSTRUCTIONS[0], num_samples=2, seed=3).tracks
    right = forecaster.forecast(image, instruction=INSTRUCTIONS[1], num_samples=2, seed=3).tracks
    unknown = forecaster.forecast(image, instruction="shove the crimson block", num_samples=2, seed=3).tracks
    unknown_again = forecaster.forecast(image, instruction="push the blue cube", num_samples=2, seed=3).tracks
    assert left.shape == (2, 4, 8, 8, 2) and np.isfinite(left).all()
    assert not np.array_equal(left, right)  # the instruction reaches the denoiser
    assert np.isfinite(unknown).all() and np.isfinite(unknown_again).all()
    again = forecaster.forecast(image, instruction=INSTRUCTIONS[0], num_samples=2, seed=3).tracks
    np.testing.assert_array_equal(left, again)
    no_instruction = forecaster.forecast(image, num_samples=2, seed=3).tracks  # the config's default: ""
    np.testing.assert_array_equal(no_instruction, forecaster.forecast(image, instruction="", num_samples=2,
                                                                      seed=3).tracks)


def test_parting_stage_fine_tunes_the_flow_on_both_data_sets(sim_data, model_run, tmp_path):
    """scripts/train_sim.sh's v3 stage through the CLI: ``data merge`` of two branch-grouped data sets (their groups
    kept apart), then ``train flow --init`` the trained flow on the merge with moving tokens weighted: the weights
    move from the init, the VAE stays the init's, and the result forecasts."""
    from safetensors.torch import load_file

    from traj_forecast_ros.cli import main
    from traj_forecast_ros.data.dataset import TrajectoryDataset
    from traj_forecast_ros.forecaster import Forecaster

    first, parting = (write_tiny_sim(tmp_path / name, scenes=3, seed=seed, branch_groups=True)
                      for name, seed in (("first", 0), ("parting", 1)))
    assert main(["data", "merge", "--out", str(tmp_path / "both"), str(first), str(parting)]) == 0
    both = TrajectoryDataset(tmp_path / "both")
    assert len(both) == 12 and sorted(set(both.load("branch_groups").tolist())) == list(range(6))
    init = model_run / "flow"
    assert main(["train", "flow", "--data", str(tmp_path / "both"), "--out", str(tmp_path / "tuned"), "--init",
                 str(init), "--moving-weight", "3", "--latent-draw", "mean", "--steps", "2", "--batch-size", "4",
                 "--log-every", "1", "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
    before, after = (load_file(str(d / "denoiser.safetensors")) for d in (init, tmp_path / "tuned"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    vae_before, vae_after = (load_file(str(d / "vae.safetensors")) for d in (init, tmp_path / "tuned"))
    assert vae_before.keys() == vae_after.keys()
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    forecast = Forecaster.from_pretrained(str(tmp_path / "tuned"), device="cpu").forecast(
        sim_data_image(sim_data, 0), instruction=INSTRUCTIONS[0], num_samples=2, seed=0)
    assert forecast.tracks.shape == (2, 4, 8, 8, 2) and np.isfinite(forecast.tracks).all()


def test_instruction_contrast_fine_tunes_on_branch_groups_only(sim_data, model_run, tmp_path):
    """``train flow --instruction-contrast`` on branch-grouped data logs the flow and contrast losses (the contrast
    below or at chance, log 2, and finite) and writes a model that forecasts; data without branch groups is refused."""
    from traj_forecast_ros.cli import main
    from traj_forecast_ros.train.flow import train_flow

    branched = write_tiny_sim(tmp_path / "branched", scenes=3, seed=2, branch_groups=True)
    assert main(["train", "flow", "--data", str(branched), "--out", str(tmp_path / "tuned"), "--init",
                 str(model_run / "flow"), "--instruction-contrast", "0.1", "--time-mean", "-0.5", "--latent-draw",
                 "mean", "--steps", "3", "--batch-size", "4", "--log-every", "1", "--no-progress", "--device", "cpu",
                 "--threads", "1"]) == 0
    rows = (tmp_path / "tuned" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss", "flow", "contrast"} <= set(header) and len(rows) == 4
    for row in rows[1:]:
        values = dict(zip(header, map(float, row.split(","))))
        assert 0 < values["contrast"] <= np.log(2) + 0.05
        assert values["loss"] == pytest.approx(values["flow"] + 0.1 * values["contrast"], rel=1e-4)
    with pytest.raises(ValueError, match="branch groups"):
        train_flow(sim_data, tmp_path / "ungrouped", quick_settings(steps=1), init=model_run / "flow",
                   instruction_contrast=0.1)


def test_contrast_on_motion_logs_the_crossed_still_term(model_run, tmp_path):
    """``--contrast-on-motion --crossed-still W`` on branch-grouped data: the log holds the crossed pass's still-token
    error, and the loss is flow + contrast weight * contrast + W * crossed_still."""
    from traj_forecast_ros.cli import main

    branched = write_tiny_sim(tmp_path / "branched", scenes=3, seed=2, branch_groups=True)
    assert main(["train", "flow", "--data", str(branched), "--out", str(tmp_path / "tuned"), "--init",
                 str(model_run / "flow"), "--instruction-contrast", "0.1", "--contrast-on-motion", "--crossed-still",
                 "2", "--latent-draw", "mean", "--steps", "3", "--batch-size", "4", "--log-every", "1",
                 "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
    rows = (tmp_path / "tuned" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss", "flow", "contrast", "crossed_still"} <= set(header) and len(rows) == 4
    for row in rows[1:]:
        values = dict(zip(header, map(float, row.split(","))))
        assert values["crossed_still"] >= 0 and np.isfinite(values["crossed_still"])
        assert values["loss"] == pytest.approx(values["flow"] + 0.1 * values["contrast"]
                                               + 2 * values["crossed_still"], rel=1e-4)
    assert any(float(dict(zip(header, row.split(",")))["crossed_still"]) > 0 for row in rows[1:])


def test_a_fine_tune_gains_the_word_bag_and_grounding_and_trains_them(sim_data, model_run, tmp_path):
    """``--word-bag --text-grounding`` on a trained model: the saved text encoder has the bag-of-words table, the
    denoiser the grounding map, both moved by training, and the model directory loads as a forecaster."""
    from safetensors.torch import load_file

    from traj_forecast_ros.cli import main
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.checkpoint import load_model_config

    assert main(["train", "flow", "--data", str(sim_data), "--out", str(tmp_path / "tuned"),
                 "--init", str(model_run / "flow"), "--word-bag", "--text-grounding", "--steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
    config = load_model_config(tmp_path / "tuned")
    assert config.text_encoder.config["pooling"] == "cls+words" and config.denoiser.text_grounding is True
    words = load_file(str(tmp_path / "tuned" / "text_encoder" / "model.safetensors"))
    before = load_file(str(model_run / "flow" / "text_encoder" / "model.safetensors"))
    assert set(words) - set(before) == {"word_bag.weight"}
    assert any(not torch.equal(words[k], v) for k, v in before.items())  # trained on, with the table
    denoiser = load_file(str(tmp_path / "tuned" / "denoiser.safetensors"))
    assert denoiser["text_grounding.out_proj.weight"].abs().sum() > 0  # left zero-initialised no more
    forecast = Forecaster.from_pretrained(tmp_path / "tuned", device="cpu").forecast(
        np.zeros((32, 32, 3), np.uint8), "pick up the red cube", num_samples=1, steps=2, seed=0)
    assert np.isfinite(forecast.tracks).all()


def test_text_encoder_is_trained_with_the_denoiser(model_run):
    from safetensors.torch import load_file

    from traj_forecast_ros.model.word_encoder import WordTextEncoder
    from traj_forecast_ros.model.checkpoint import load_model_config

    config = load_model_config(model_run / "flow")
    torch.manual_seed(0)  # the seed train_flow builds it with
    initial = WordTextEncoder.from_config(config.text_encoder).state_dict()
    trained = load_file(str(model_run / "flow" / "text_encoder" / "model.safetensors"))
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    # trained with instruction dropout: the empty instruction is the unconditional one, so guidance is available
    assert config.null_instruction == "" and config.supports_guidance
    encoder = WordTextEncoder.from_config(config.text_encoder, model_dir=model_run / "flow")
    with torch.no_grad():
        push, pick, empty = encoder(["push the red cube to the left", "pick up the red cube", ""])
    assert (push - pick).norm() > 1e-3 * push.norm() and (push - empty).norm() > 1e-3 * push.norm()


def test_the_word_bag_needs_the_words_text_encoder(tiny_data, tmp_path, make_settings):
    from traj_forecast_ros.train.flow import train_flow
    from traj_forecast_ros.train.vae import train_vae

    config = preset_config("tiny-blocks")  # the tiny-sim geometry without instructions: no words encoder to extend
    assert config.text_encoder is None
    train_vae(tiny_data, tmp_path / "vae", config, make_settings(steps=1))
    with pytest.raises(ValueError, match="word-bag"):
        train_flow(tiny_data, tmp_path / "flow", make_settings(steps=1), vae_dir=tmp_path / "vae", word_bag=True)
    assert not (tmp_path / "flow" / "denoiser.safetensors").exists()


def test_flow_with_words_encoder_needs_instructions(tiny_data, tmp_path, make_settings):
    from traj_forecast_ros.train.flow import train_flow
    from traj_forecast_ros.train.vae import train_vae

    config = preset_config("tiny-sim")  # the tiny-blocks geometry, with a words text encoder
    train_vae(tiny_data, tmp_path / "vae", config, make_settings(steps=1))
    with pytest.raises(ValueError, match="no 'instructions' field"):
        train_flow(tiny_data, tmp_path / "flow", make_settings(steps=1), vae_dir=tmp_path / "vae")


def test_per_view_and_per_kind_evaluation(sim_data, model_run, tmp_path, make_settings):
    from traj_forecast_ros.train.evaluate import evaluate, format_kind_table
    from traj_forecast_ros.train.regressor import train_regressor

    train_regressor(sim_data, tmp_path / "regressor", preset_config("tiny-sim"), make_settings(steps=2),
                    encoder_dir=model_run / "vae")
    report = evaluate(sim_data, model=str(model_run / "flow"), regressor=tmp_path / "regressor", num_samples=2,
                      max_scenes=8, device="cpu", figure=tmp_path / "figure.png")
    report = json.loads(json.dumps(report))  # JSON-friendly
    # one row per kind x view (push x 2 views); truth, ours best and worst of K, regressor: 256 px panels + titles
    assert report["figure"] == str(tmp_path / "figure.png")
    assert Image.open(report["figure"]).size == (4 * 256 + 3 * 4, 2 * (256 + HEADER_PX) + 4)
    assert report["instructions"] is True
    assert set(report["per_view"]) == set(VIEWS) and set(report["per_kind"]) == {"push"}
    methods = {"ours", "zero_motion", "regressor"}
    for group in ("per_view", "per_kind"):
        for label, values in report[group].items():
            assert set(values) == methods, (group, label)
            for method in methods:
                for key in ("best_of_k_mse", "fvmd", "lrtl", "diversity", "background_mean_displacement",
                            "background_moving_share"):
                    assert key in values[method], (group, label, method, key)
    assert sum(report["per_view"][v]["ours"]["scenes"] for v in VIEWS) == 8
    zero = report["results"]["zero_motion"]
    assert zero["diversity"] == 0.0 and zero["background_mean_displacement"] == 0.0
    assert zero["background_moving_share"] == 0.0
    assert all(report["per_view"][v]["zero_motion"]["diversity"] == 0.0 for v in VIEWS)
    assert report["results"]["regressor"]["diversity"] == 0.0
    # zero motion is exact on the static points: its best-of-K is the cube's motion only
    assert zero["best_of_k_mse"] > 0.0
    unconditioned = evaluate(sim_data, model=str(model_run / "flow"), num_samples=2, max_scenes=8, device="cpu",
                             use_instructions=False)
    assert unconditioned["instructions"] is False and set(unconditioned["results"]) == {"ours", "zero_motion"}
    table = format_kind_table(report, "per_view")
    assert "| agentview |" in table and "ours FVMD" in table


def test_vae_bound_decodes_each_true_future(sim_data, model_run):
    """The VAE bound reads the truth: two samples with one image and opposite pushes get different reconstructions
    (a forecaster sees only the image); all K copies agree; and it matches the VAE run by hand on that truth."""
    from traj_forecast_ros.data.dataset import TrajectoryDataset
    from traj_forecast_ros.train.evaluate import evaluate, vae_reconstruction_predictions

    dataset = TrajectoryDataset(sim_data)
    assert np.array_equal(dataset[0].image, dataset[1].image)  # one scene, pushed left and right
    pred = vae_reconstruction_predictions(str(model_run / "flow"), dataset, [0, 1], num_samples=3, device="cpu")
    assert pred.shape == (2, 3, *dataset[0].tracks.shape[1:]) and np.array_equal(pred[:, 0], pred[:, 2])
    assert np.abs(pred[0, 0] - pred[1, 0]).max() > 1e-3
    from traj_forecast_ros.forecaster import Forecaster

    forecaster = Forecaster.from_pretrained(str(model_run / "flow"), device="cpu", dtype="float32")
    truth = torch.from_numpy(dataset.gather("tracks", [1])[0, 0])[None]  # [1, T, Hq, Wq, 2] pixels, 128 px image
    features = forecaster.encode_image(dataset[1].image)
    with torch.no_grad():
        mean, _ = forecaster.vae.encode((truth / 64.0 - 1.0).permute(0, 1, 4, 2, 3), features)
        by_hand = (forecaster.vae.decode(mean, features).permute(0, 1, 3, 4, 2) + 1.0) * 64.0
    np.testing.assert_allclose(pred[1, 0], by_hand[0].numpy(), atol=1e-3)
    report = evaluate(sim_data, model=str(model_run / "flow"), num_samples=2, max_scenes=4, device="cpu",
                      vae_bound=True)
    bound = report["results"]["vae_reconstruction"]
    assert bound["diversity"] == 0.0 and bound["best_of_k_mse"] == pytest.approx(bound["mean_of_k_mse"])


def test_rare_classes_weigh_more_and_absent_classes_nothing(sim_data):
    from traj_forecast_ros.data.dataset import TrajectoryDataset
    from traj_forecast_ros.train.encoder import class_weights_of

    dataset = TrajectoryDataset(sim_data)
    weights = class_weights_of(dataset, 4).numpy()
    counts = np.bincount(dataset.load("segmentation").ravel(), minlength=4) / dataset.load("segmentation").size
    assert weights[2] == 0.0 and counts[2] == 0.0  # no robot pixels in this set
    assert weights[0] > weights[3] > weights[1] > 0.0  # empty rows < cube < table in pixel share
    assert np.isclose((weights * counts).sum(), 1.0)


def test_encoder_and_vae_commands(sim_data, tmp_path, capsys):
    from traj_forecast_ros.cli import main
    from traj_forecast_ros.train.data import build_image_encoder, encoder_fingerprint

    quick = ["--steps", "2", "--batch-size", "4", "--log-every", "1", "--no-progress", "--device", "cpu",
             "--threads", "1"]
    assert main(["train", "encoder", "--data", str(sim_data), "--out", str(tmp_path / "enc"), "--config", "tiny-sim",
                 "--eval-data", str(sim_data), *quick]) == 0
    scores = json.loads((tmp_path / "enc" / "encoder_eval.json").read_text())
    assert set(scores) == {"samples", "depth_l1_m", "segmentation_acc", "segmentation_miou"}
    assert json.loads((tmp_path / "enc" / "encoder.json").read_text())["frozen_backbone"] is False
    assert main(["train", "vae", "--data", str(sim_data), "--out", str(tmp_path / "vae"), "--config", "tiny-sim",
                 "--encoder", str(tmp_path / "enc"), *quick]) == 0
    config = preset_config("tiny-sim")
    frozen = build_image_encoder(config, model_dir=tmp_path / "vae")  # the VAE run froze the pretrained one
    pretrained = build_image_encoder(config, model_dir=tmp_path / "enc")
    assert encoder_fingerprint(frozen, config.image_size) == encoder_fingerprint(pretrained, config.image_size)
    capsys.readouterr()
