"""Training machinery shared by the VAE, flow, regressor and encoder stages (the loop itself is
:mod:`traj_forecast_ros.train.trainer`).

* :class:`TrainSettings`: optimiser (AdamW, linear warmup then constant LR as in the official recipe, or a cosine
  decay), precision, clipping, EMA, logging and checkpoint cadence.
* Placement: :func:`distributed` reads torchrun's environment; with ``WORLD_SIZE > 1`` it calls
  ``init_process_group`` (NCCL on CUDA, Gloo on CPU); :func:`resolve_train_device` gives each rank its GPU.
* Precision and stability: :func:`autocast_context` (bf16 on CPU when asked, fp16/bf16 on CUDA),
  :func:`sanitize_and_clip` (NaN/Inf gradients zeroed, norm clipped), :func:`warmup_schedule`, :class:`EMA`.
* Determinism: :class:`BatchPlan` (a ``DistributedSampler`` permutation per epoch, so step ``s`` always sees the same
  samples) and :func:`step_generator` (the objective's noise per ``(seed, step, rank)``).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from traj_forecast_ros.errors import DeviceError
from traj_forecast_ros.sampling_plan import resolve_device

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
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group (no-op for single-process runs)."""
    if info.distributed and dist.is_initialized():
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
