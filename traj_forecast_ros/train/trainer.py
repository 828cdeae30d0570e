"""The training loop of every stage: :class:`Trainer`, its checkpoints and its metrics log.

* :class:`Trainer`: each step draws a deterministic batch (:class:`~traj_forecast_ros.train.common.BatchPlan`), seeds
  a per-step ``torch.Generator`` for every random draw of the objective, runs the objective under autocast (with a
  grad scaler for fp16), zeroes NaN/Inf gradients, clips the gradient norm, steps AdamW and the scheduler and updates
  the EMA. Because both the batch and the noise are functions of ``(seed, step, rank)``, resuming from a checkpoint
  gives exactly the step an uninterrupted run would have taken. Distributed runs wrap the objective in
  ``DistributedDataParallel``; each rank takes its slice of every global batch.
* Checkpoints (``<out>/checkpoints/last.pt``, written atomically) hold the model, optimiser, scheduler, EMA, grad
  scaler, step and the python/numpy/torch RNG states.
* Logging: ``<out>/metrics.csv`` (one row per ``log_every`` steps), TensorBoard when ``torch.utils.tensorboard``
  can be imported, a tqdm progress bar on rank 0.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from traj_forecast_ros.errors import CheckpointError
from traj_forecast_ros.train.common import (
    EMA,
    BatchPlan,
    DistInfo,
    TrainSettings,
    autocast_context,
    sanitize_and_clip,
    step_generator,
    warmup_schedule,
)

try:  # TensorBoard is optional (not in requirements.txt): without it the metrics go to metrics.csv only
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
METRICS_FILE = "metrics.csv"


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
        if enabled and tensorboard and SummaryWriter is not None:
            try:
                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # an unusable TensorBoard install: CSV only
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
