"""Training machinery: EMA, gradient sanitising, LR schedule, deterministic sharded batches, CSV log, precision."""

import numpy as np
import pytest
import torch
from torch import nn

from traj_forecast_ros.errors import CheckpointError, DeviceError
from traj_forecast_ros.train import common
from traj_forecast_ros.train import trainer as training


def test_ema_follows_the_documented_decay_schedule():
    module = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(module.weight)
    ema = common.EMA(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay_1 = min(0.9, 2 / 11)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    ema.update(module)  # decay_2 = min(0.9, 3 / 12)
    assert ema.shadow["weight"].item() == pytest.approx(1 - (2 / 11) * (3 / 12))
    restored = common.EMA(nn.Linear(1, 1, bias=False), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 2


def test_ema_copies_fixed_tables_and_buffers_exactly():
    """Frozen parameters (the denoiser's sin-cos tables) and buffers are copied, not averaged: no rounding drift."""
    from traj_forecast_ros.model.presets import tiny_config
    from traj_forecast_ros.model.denoiser import LatteDenoiser

    torch.manual_seed(0)
    model = LatteDenoiser(tiny_config().denoiser)
    ema = common.EMA(model, decay=0.999)
    for _ in range(300):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.01)
        ema.update(model)
    tables = model.sincos_tables()
    assert tables
    for name, table in tables.items():
        assert torch.equal(ema.shadow[name], getattr(model, name).detach()), name
        assert torch.equal(ema.shadow[name], table.to(ema.shadow[name].dtype)), name
    trainable = next(name for name, p in model.named_parameters() if p.requires_grad)
    assert not torch.equal(ema.shadow[trainable], model.state_dict()[trainable])  # trainable weights lag behind


def test_non_finite_gradients_are_zeroed_then_clipped():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([float("nan"), 3.0, float("inf")])
    b.grad = torch.tensor([4.0, float("-inf")])
    norm = common.sanitize_and_clip([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)  # sqrt(3^2 + 4^2) once NaN/Inf are zeroed
    np.testing.assert_allclose(a.grad.numpy(), [0.0, 0.6, 0.0], atol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), [0.8, 0.0], atol=1e-6)


def test_linear_warmup_then_constant_learning_rate():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = common.warmup_schedule(optimizer, warmup_steps=3)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(rates, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_schedule_decays_to_the_minimum_ratio():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = common.warmup_schedule(optimizer, warmup_steps=1, kind="cosine", total_steps=5, min_ratio=0.1)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup (step 0), then 0.1 + 0.9 * (1 + cos(pi * k / 4)) / 2 for k = 0..4, then held at the minimum
    expected = [0.5] + [0.1 + 0.45 * (1 + np.cos(np.pi * k / 4)) for k in range(5)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_batches_are_deterministic_and_disjoint_across_ranks():
    single = common.BatchPlan(10, 3, seed=1, info=common.DistInfo())
    again = common.BatchPlan(10, 3, seed=1, info=common.DistInfo())
    for step in (0, 1, 2, 3, 7):
        np.testing.assert_array_equal(single.indices(step), again.indices(step))
    epoch0 = np.concatenate([single.indices(s) for s in range(single.steps_per_epoch)])
    assert len(set(epoch0.tolist())) == len(epoch0)  # no repeats within an epoch
    assert not np.array_equal(single.indices(0), single.indices(single.steps_per_epoch))  # reshuffled next epoch
    ranks = [common.BatchPlan(10, 2, seed=1, info=common.DistInfo(rank=r, world_size=2)) for r in range(2)]
    for step in range(2):
        assert not set(ranks[0].indices(step).tolist()) & set(ranks[1].indices(step).tolist())
    tiny = common.BatchPlan(2, 5, seed=0, info=common.DistInfo())
    assert len(tiny.indices(0)) == 5 and set(tiny.indices(0).tolist()) == {0, 1}  # wraps around small sets


def test_step_generator_depends_only_on_seed_step_rank():
    draw = lambda *args: torch.randn(3, generator=common.step_generator(*args, torch.device("cpu")))  # noqa: E731
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))


def test_metrics_csv_appends_across_loggers(tmp_path, read_metrics):
    logger = training.MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 2.0, "lr": 0.1})
    logger = training.MetricsLogger(tmp_path, tensorboard=False)  # a resumed run keeps the header
    logger.log(2, {"loss": 1.5, "lr": 0.1})
    rows = read_metrics(tmp_path / training.METRICS_FILE)
    assert rows == [{"step": 1.0, "loss": 2.0, "lr": 0.1}, {"step": 2.0, "loss": 1.5, "lr": 0.1}]


def test_precision_contexts():
    cpu = torch.device("cpu")
    with common.autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with common.autocast_context(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(DeviceError, match="fp16"):
        common.autocast_context(cpu, "fp16")
    with pytest.raises(ValueError, match="precision"):
        common.TrainSettings(precision="int8")


def test_single_process_distributed_setup_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    info = common.setup_distributed("cpu")
    assert not info.distributed and info.is_main and info.device.type == "cpu"


def test_bare_cuda_device_gets_the_local_rank(monkeypatch):
    """Under torchrun a bare ``cuda`` must become ``cuda:<LOCAL_RANK>`` (set_device / DDP need an index)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert common.resolve_train_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert common.resolve_train_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert common.resolve_train_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert common.resolve_train_device("cpu", local_rank=2) == torch.device("cpu")
    with pytest.raises(DeviceError, match="only 4 CUDA device"):  # the shared resolver checks the index
        common.resolve_train_device("cuda", local_rank=5)
    with pytest.raises(DeviceError, match="unknown device"):
        common.resolve_train_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA"):
        common.resolve_train_device("cuda", local_rank=0)


def test_distributed_context_is_a_single_process_on_cpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with common.distributed("cpu") as info:
        assert info.world_size == 1 and info.is_main and info.device == torch.device("cpu")


# ------------------------------------------------------------------------------------------------ S1: checkpoints
class _Payload:
    """Pickles to a call of ``os.system``-like code: what a crafted ``last.pt`` would run on load."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "last.pt"
    torch.save({"stage": "flow", "step": 1, "model": {}, "evil": _Payload(marker)}, crafted)
    with pytest.raises(CheckpointError, match="refused"):
        training.load_checkpoint(crafted)
    assert not marker.exists(), "torch.load ran the pickled payload"


def test_a_trainer_checkpoint_round_trips_with_weights_only(tmp_path):
    model = nn.Linear(3, 2)

    class Objective(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x, generator=None):
            return {"loss": self.model(x).pow(2).mean()}

    settings = common.TrainSettings(steps=2, batch_size=2, device="cpu", progress=False, ema_decay=0.9,
                                    log_every=1, checkpoint_every=1)
    trainer = training.Trainer(Objective(), model, lambda idx: {"x": torch.randn(len(idx), 3)}, 8, settings,
                             tmp_path, common.DistInfo(), "test")
    np.random.seed(123)
    path = trainer.save(tmp_path / "last.pt")
    expected = np.random.rand(3)
    state = training.load_checkpoint(path)  # weights_only=True: must accept what Trainer writes
    assert state["stage"] == "test" and set(state["model"]) == {"weight", "bias"}
    np.random.seed(0)
    training.set_rng_state(state["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)
