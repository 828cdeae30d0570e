"""Training machinery shared by the VAE, flow and regressor stages.

* :class:`TrainSettings`: optimiser (AdamW, linear warmup then constant LR as in the official recipe, or a cosine
  decay), precision, clipping, EMA, logging and
  checkpoint cadence.
* :class:`Trainer`: the loop. Each step draws a deterministic batch (a ``DistributedSampler`` permutation per epoch,
  so step ``s`` always sees the same samples), seeds a per-step ``torch.Generator`` for every random draw of the
  objective, runs the objective under autocast (bf16 on CPU when asked, fp16/bf16 on CUDA with a grad scaler for
  fp16), zeroes NaN/Inf gradients, clips the gradient norm (1.0), steps AdamW and the scheduler and updates the EMA.
  Because both the batch and the noise are functions of ``(seed, step, rank)``, resuming from a checkpoint gives
  exactly the step an uninterrupted run would have taken.
* Checkpoints (``<out>/checkpoints/last.pt``, written atomically) hold the model, optimiser, scheduler, EMA, grad
  scaler, step and the python/numpy/torch RNG states.
* Logging: ``<out>/metrics.csv`` (one row per ``log_every`` steps), TensorBoard when ``torch.utils.tensorboard``
  can be imported, a tqdm progress bar on rank 0.
* Multi-GPU: launched with ``torchrun``, ``WORLD_SIZE > 1`` makes :func:`setup_distributed` call
  ``init_process_group`` (NCCL on CUDA, Gloo on CPU) and the objective is wrapped in ``DistributedDataParallel``;
  each rank takes its slice of every global batch. Nothing in the command line changes.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import pickle
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from traj_forecast_ros.errors import CheckpointError, DeviceError
from traj_forecast_ros.sampling_plan import resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.csv"
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class TrainSettings:
    """Hyperparameters of one training run (every stage)."""

    steps: int = 1000
    batch_size: int = 16  # per rank
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "constant"  # after warmup: constant (official recipe) or cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: Optional[float] = None  # e.g. 0.999; None = no EMA
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got '{self.schedule}'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        self.betas = tuple(self.betas)


# ------------------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that logs and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1


def resolve_train_device(device: Union[str, torch.device] = "auto", local_rank: int = 0) -> torch.device:
    """The training device: :func:`~traj_forecast_ros.sampling_plan.resolve_device` (the project's one resolver)
    with the local rank on top: when CUDA is available, ``auto`` and a bare ``cuda`` become ``cuda:<local_rank>``
    (each torchrun process its own GPU; ``set_device`` and DDP need an index). An unavailable device raises
    :class:`DeviceError`."""
    if str(device).strip().lower() in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    return resolve_device(device)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and join the process group if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_train_device(device, local_rank)
    if world_size > 1:
        import torch.distributed as dist

        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group (no-op for single-process runs)."""
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """:func:`setup_distributed` on entry, :func:`cleanup_distributed` on exit (also when the body raises)."""
    info = setup_distributed(device)
    try:
        yield info
    finally:
        cleanup_distributed(info)


# ------------------------------------------------------------------------------------------------ precision
def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16 (fp16 needs CUDA), or a null context for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("fp16 autocast needs CUDA (on the CPU it runs 4-5x slower than fp32); use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sanitize_and_clip(parameters: Sequence[nn.Parameter], max_norm: float) -> float:
    """Zero every NaN/Inf gradient entry, then clip the total norm to ``max_norm``; returns the pre-clip norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    for grad in grads:
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, kind: str = "constant",
                    total_steps: int = 1, min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 to the base LR over ``warmup_steps``, then constant (``kind="constant"``, the official
    LinearWarmupScheduler), or cosine decay reaching ``min_ratio`` at ``total_steps``."""
    warmup = max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------ EMA
class EMA:
    """Exponential moving average of a module's trainable parameters; everything else (buffers, frozen parameters
    such as fixed sin-cos tables) is copied, so constants do not drift by float rounding.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the random init.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            key: value.detach().clone() for key, value in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Blend the module's current state into the average."""
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
        for key, value in module.state_dict().items():
            shadow = self.shadow[key]
            if key in trainable and shadow.is_floating_point():
                shadow.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        """Serialisable state (decay, update count, tensors)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)


# ------------------------------------------------------------------------------------------------ batches
class BatchPlan:
    """Deterministic batches: a ``DistributedSampler`` permutation per epoch, sliced into per-rank batches.

    ``indices(step)`` depends only on ``(seed, step, rank)``, so a resumed run draws the same batches.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, info: DistInfo) -> None:
        from torch.utils.data import DistributedSampler

        if num_examples < 1:
            raise ValueError("the training set is empty")
        self.batch_size = batch_size
        self.sampler = DistributedSampler(range(num_examples), num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=seed, drop_last=num_examples >= info.world_size)
        self.per_rank = len(self.sampler)
        self.steps_per_epoch = max(1, self.per_rank // batch_size)
        self._epoch = -1
        self._order: List[int] = []

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of this rank's batch at ``step`` (wraps around when the set is smaller than a batch)."""
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order = list(iter(self.sampler))
            self._epoch = epoch
        start = (step % self.steps_per_epoch) * self.batch_size
        positions = (start + np.arange(self.batch_size)) % len(self._order)
        return np.asarray(self._order)[positions]


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator seeded from ``(seed, step, rank)``: the objective's noise for one step."""
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(mixed) & ((1 << 63) - 1))
    return generator


# ------------------------------------------------------------------------------------------------ logging
class MetricsLogger:
    """Append rows to ``metrics.csv`` (header from the first row) and mirror them to TensorBoard when available."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self._fields: Optional[List[str]] = None
        self._writer = None
        if enabled and self.path.is_file():
            with self.path.open() as handle:
                header = handle.readline().strip()
            self._fields = header.split(",") if header else None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: CSV only
                self._writer = None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Write one row ``step, values...``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        if self._fields is None:
            self._fields = list(row)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self._fields)
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(name, "") for name in self._fields])
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._writer is not None:
            self._writer.close()


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename (a crash never leaves a truncated checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a training checkpoint written by :class:`Trainer` (``CheckpointError`` when unreadable)."""
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint to resume from: {path}")
    try:
        # weights_only: tensors, containers and plain numbers only; a pickled object (code) is refused, never run.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: the checkpoint holds Python objects other than tensors and plain "
                              f"values (a checkpoint written by an older version, or a crafted file); only "
                              f"checkpoints written by this version resume ({exc})") from exc
    except Exception as exc:  # truncated / corrupt file
        raise CheckpointError(f"{path}: unreadable training checkpoint ({exc})") from exc


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)),  # [624] (uint32 values)
                   "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    # Tensors and plain values only, so load_checkpoint can read it with torch.load(weights_only=True).
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["algorithm"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ trainer
BatchFn = Callable[[np.ndarray], Dict[str, torch.Tensor]]


class Trainer:
    """Optimise ``objective`` (an ``nn.Module`` whose ``forward(**batch, generator=g)`` returns a dict with ``loss``).

    Args:
        objective: module computing the losses; wrapped in DDP when distributed.
        model: the sub-module whose weights are trained, averaged (EMA) and saved.
        make_batch: ``indices -> dict of tensors`` (on any device; moved to the training device here).
        num_examples: size of the training set.
        settings: :class:`TrainSettings`.
        out_dir: run directory (checkpoints, metrics.csv).
        info: distributed placement (:func:`setup_distributed`).
        stage: name stored in checkpoints (refuses to resume another stage's checkpoint).
    """

    def __init__(self, objective: nn.Module, model: nn.Module, make_batch: BatchFn, num_examples: int,
                 settings: TrainSettings, out_dir: Union[str, Path], info: DistInfo, stage: str) -> None:
        self.settings = settings
        self.info = info
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.device = info.device
        self.model = model
        self.objective = objective.to(self.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.scheduler = warmup_schedule(self.optimizer, settings.warmup_steps, settings.schedule, settings.steps,
                                         settings.min_lr_ratio)
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.precision == "fp16" and self.device.type == "cuda")
        self.ema = EMA(model, settings.ema_decay) if settings.ema_decay else None
        self.make_batch = make_batch
        self.plan = BatchPlan(num_examples, settings.batch_size, settings.seed, info)
        self.step = 0
        self.wrapped: nn.Module = self.objective
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.objective, device_ids=device_ids)
        self.checkpoint_path = self.out_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly where this run is."""
        return {
            "stage": self.stage,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "settings": dataclasses.asdict(self.settings),
        }

    def save(self, path: Optional[Path] = None) -> Path:
        """Write a checkpoint (rank 0 only); returns its path."""
        path = path or self.checkpoint_path
        if self.info.is_main:
            save_checkpoint(path, self.state_dict())
        return path

    def resume(self, path: Optional[Path] = None) -> int:
        """Restore a checkpoint written by :meth:`save`; returns the step to continue from."""
        path = path or self.checkpoint_path
        state = load_checkpoint(path)
        if state.get("stage") != self.stage:
            raise CheckpointError(f"{path}: a '{state.get('stage')}' checkpoint cannot resume '{self.stage}' training")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError(f"{path}: was trained without EMA; resume without --ema-decay")
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        saved_lr = float(state.get("settings", {}).get("lr", self.settings.lr))
        if saved_lr != self.settings.lr:  # a new --lr on resume replaces the base rate from here on
            log.info("resuming with lr %g instead of %g", self.settings.lr, saved_lr)
            self.scheduler.base_lrs = [self.settings.lr] * len(self.optimizer.param_groups)
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group in self.optimizer.param_groups:
                group["initial_lr"] = self.settings.lr
                group["lr"] = self.settings.lr * factor
        return self.step

    # -------------------------------------------------------------------------------------- loop
    def train_step(self) -> Dict[str, float]:
        """One optimisation step at ``self.step``; returns the logged values."""
        settings = self.settings
        self.objective.train()
        batch = self.make_batch(self.plan.indices(self.step))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        generator = step_generator(settings.seed, self.step, self.info.rank, self.device)
        with autocast_context(self.device, settings.precision):
            losses = self.wrapped(**batch, generator=generator)
        loss = losses["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.float()).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = sanitize_and_clip(self.trainable, settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        values = {k: float(v.detach().float()) for k, v in losses.items()}
        values["grad_norm"] = grad_norm
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        return values

    def fit(self, resume: bool = False,
            on_log: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, float]:
        """Train until ``settings.steps``; checkpoints every ``checkpoint_every`` steps and at the end.

        Returns the last logged values. Non-finite losses are logged and the step still counts (their gradients are
        zeroed); ``resume=True`` continues from ``<out>/checkpoints/last.pt``.
        """
        settings = self.settings
        if resume:
            self.resume()
            log.info("resumed %s training at step %d", self.stage, self.step)
        logger = MetricsLogger(self.out_dir, enabled=self.info.is_main)
        progress = None
        if settings.progress and self.info.is_main:
            from tqdm import tqdm

            progress = tqdm(total=settings.steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True)
        last: Dict[str, float] = {}
        window: List[Dict[str, float]] = []
        tick = time.perf_counter()
        try:
            while self.step < settings.steps:
                values = self.train_step()
                window.append(values)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{values['loss']:.4g}")
                if self.step % settings.log_every == 0 or self.step == settings.steps:
                    elapsed = time.perf_counter() - tick
                    last = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    last["seconds_per_step"] = elapsed / len(window)
                    last["examples_per_second"] = len(window) * settings.batch_size * self.info.world_size / elapsed
                    logger.log(self.step, last)
                    if on_log is not None:
                        on_log(self.step, last)
                    window, tick = [], time.perf_counter()
                if self.step % settings.checkpoint_every == 0 or self.step == settings.steps:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            logger.close()
        return last

    def averaged_model_state(self) -> Dict[str, torch.Tensor]:
        """The EMA weights when EMA is on, else the current weights."""
        if self.ema is not None:
            return {k: v.clone() for k, v in self.ema.shadow.items()}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
