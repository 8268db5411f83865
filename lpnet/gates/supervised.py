"""Supervised training on (inputs, targets) batches: SGD epochs under a cosine learning-rate schedule,
top-1 accuracy, and BatchNorm statistics recomputed on data. The train mode (`lpnet.gates.training`)
runs joint training and fine-tuning with these."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batches = Iterable[Any]
"""Anything yielding (inputs, targets) pairs, e.g. a DataLoader."""


@dataclass(frozen=True)
class CosineSpan:
    """The part of a cosine learning-rate schedule `total` epochs long that starts at epoch `start`.

    The train mode runs joint training and fine-tuning as one schedule: the learning rate is still
    high when the gates have settled, so the network adapts to the channels it lost, instead of
    decaying to zero at the end of the joint phase and restarting for fine-tuning.
    """

    start: int
    total: int

    def factors(self, steps_per_epoch: int) -> Callable[[int], float]:
        """Learning-rate factor of the k-th step of this span."""
        offset = self.start * steps_per_epoch
        length = max(1, self.total * steps_per_epoch)

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(offset + step, length) / length))

        return factor


def evaluate_accuracy(module: nn.Module, batches: Batches, max_batches: int | None = None) -> float:
    """Top-1 accuracy of `module` (eval mode) on (inputs, targets) batches."""
    was_training = module.training
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for index, (inputs, targets) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            correct += int((module(inputs).argmax(1) == targets).sum())
            total += int(targets.numel())
    module.train(was_training)
    return correct / max(total, 1)


def train_epochs(
    module: nn.Module,
    batches: Batches,
    epochs: int,
    learning_rate: float,
    weight_decay: float = 5e-4,
    max_batches: int | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    extra_optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[int], None] | None = None,
    schedule: CosineSpan | None = None,
) -> list[float]:
    """Train with SGD (momentum 0.9, cosine decay) on cross-entropy; returns the mean loss per epoch.

    `extra_loss` is added to every step's loss (read after the forward), `extra_optimizer` steps
    alongside SGD, and `after_step(step)` runs after each step. The learning rate decays over these
    epochs, or over the part `schedule` names of a longer cosine schedule.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    per_epoch = max(max_batches if max_batches is not None else epoch_length(batches), 1)
    span = schedule or CosineSpan(0, epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, span.factors(per_epoch))
    history: list[float] = []
    step = 0
    module.train()
    for _ in range(epochs):
        losses = []
        for index, (inputs, targets) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            loss = F.cross_entropy(module(inputs), targets)
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            if extra_optimizer is not None:
                extra_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if extra_optimizer is not None:
                extra_optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(step)
            losses.append(float(loss.detach()))
            step += 1
        history.append(sum(losses) / max(len(losses), 1))
    module.eval()
    return history


def recalibrate_batch_norm(module: nn.Module, batches: Batches, max_batches: int = 20) -> None:
    """Recompute every BatchNorm's running statistics on data (weights untouched).

    Running statistics gathered while gates switched channels on and off, or before channels were
    removed, describe a network that no longer exists; a few forward passes fix them.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = module.training
    module.train()
    with torch.no_grad():
        for index, (inputs, _targets) in enumerate(batches):
            if index >= max_batches:
                break
            module(inputs)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    module.train(was_training)


def epoch_length(batches: Batches) -> int:
    """Batches in one epoch: the loader's length, or 1 for batches without one."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return 1
