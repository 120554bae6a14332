"""The training loop shared by teachers and students: optimiser, one epoch, divergence check."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from kdsearch.spaces import TrainConfig
from kdsearch.spaces.errors import TrialDiverged
from kdsearch.trainers.data import batches
from kdsearch.trainers.device import autocast, on_accelerator, to_device, uses_conv


StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.momentum > 0)  # nesterov needs momentum
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over the whole run: short budgets still end at a low learning rate."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


#: ``on_fraction(fraction, mean_loss)``: called inside an epoch once ``fraction`` of it is trained
OnFraction = Callable[[float, float], None]


#: on an accelerator the loss is read back (a host-device sync) once per this many steps, not every step
CHECK_EVERY = 32


def train_epoch(modules: nn.Module, dataset: Dataset, batch_size: int, seed: int,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                step_loss: StepLoss, epoch: int, device: str = "cpu",
                fractions: Sequence[float] = (), on_fraction: OnFraction | None = None,
                grad_clip: float = 0.0, on_step: Callable[[int], None] | None = None,
                precision: str = "fp32", scaler: "torch.amp.GradScaler | None" = None) -> float:
    """One pass over ``dataset``; returns the mean loss, raises :class:`TrialDiverged` on NaN/inf.

    ``on_step(n)`` is told the samples of each step done (a progress bar's ``update``).

    ``on_fraction`` is called after the first step at or past each of ``fractions`` (in (0, 1)) with
    the fraction really trained, so an early-stopping rung inside an epoch is judged on time.

    ``precision`` (``train.precision``) and ``scaler`` (fp16's, :func:`~kdsearch.trainers.device.gradient_scaler`)
    apply on an accelerator; there the loss stays on the device and is checked every
    :data:`CHECK_EVERY` steps, so the host queues steps ahead instead of waiting for each one.
    """
    modules.train()
    accelerated = on_accelerator(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    steps = steps_per_epoch(dataset, batch_size)
    # 1e-9: a fraction that lands on a step boundary (1/3 of 45 steps) is due at that step, not the next
    due = sorted({min(steps, max(1, math.ceil(f * steps - 1e-9))) for f in fractions if 0 < f < 1})
    channels_last = accelerated and uses_conv(modules)

    def check(step: int, loss: torch.Tensor) -> None:
        if not torch.isfinite(total):
            bad = loss.item() if not torch.isfinite(loss) else float("nan")
            raise TrialDiverged(f"diverged: loss became {bad} by step {step} of epoch {epoch + 1}")

    for step, (idx, x, y) in enumerate(batches(dataset, batch_size, shuffle=True, seed=seed + epoch), start=1):
        x, y = to_device(x, device), to_device(y, device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loss = step_loss(idx, x, y)
        total += loss.detach().double() * len(y)
        count += len(y)
        if not accelerated or step % CHECK_EVERY == 0 or step == steps or step in due:
            check(step, loss)  # before the step: a diverged loss never reaches the weights on a CPU
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(modules.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(modules.parameters(), grad_clip)
            optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(len(y))
        if on_fraction is not None and due and step == due[0] and step < steps:
            due.pop(0)
            on_fraction(step / steps, float(total) / count)
            modules.train()  # on_fraction may evaluate
    return float(total) / max(count, 1)


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return math.ceil(len(dataset) / batch_size)  # type: ignore[arg-type]
