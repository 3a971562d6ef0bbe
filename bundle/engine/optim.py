"""Optimizer parameter groups (the network, encoder at its own rate or frozen, plus the loss's learnable prompts)
and the learning-rate schedule (linear warm-up, then poly decay)."""

from __future__ import annotations

import logging

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bundle.errors import BundleInputError

__all__ = ["optimizer_param_groups", "warmup_poly_schedule"]

logger = logging.getLogger(__name__)


def optimizer_param_groups(
    network: nn.Module,
    lr: float,
    encoder_lr_scale: float = 1.0,
    criterion: nn.Module | None = None,
    text_lr_scale: float = 1.0,
) -> list[dict]:
    """Parameter groups for a torch optimizer.

    The network's own :meth:`parameter_groups` (when it has one) puts the encoder at ``lr * encoder_lr_scale`` and
    leaves a frozen encoder out; the criterion's trainable parameters (the prompt learner's context vectors and
    projection) get ``lr * text_lr_scale``. Parameters with ``requires_grad=False`` are never included. A network
    wrapped in ``DistributedDataParallel`` is unwrapped first.
    """
    if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        network = network.module
    if hasattr(network, "parameter_groups"):
        groups = list(network.parameter_groups(lr, encoder_lr_scale))
    else:
        groups = [{"params": [p for p in network.parameters() if p.requires_grad], "lr": lr, "name": "network"}]
    if criterion is not None:
        extra = [p for p in criterion.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra, "lr": lr * text_lr_scale, "name": "prompts"})
    return [g for g in groups if len(list(g["params"])) > 0]


def warmup_poly_schedule(
    optimizer: Optimizer, total_iterations: int, warmup_iterations: int = 0, power: float = 0.9
) -> LambdaLR:
    """Linear warm-up from ``1 / (warmup + 1)`` of each group's rate to all of it, then poly decay to 0.

    A network trained from scratch with a high rate diverges or stalls in its first iterations (AdamW's second-moment
    estimates start from nothing); the warm-up lets them settle. ``warmup_iterations=0`` is torch's ``PolynomialLR``.
    A run shorter than twice the warm-up (a smoke test) warms up for half of its iterations instead, and says so.
    """
    total, warmup = int(total_iterations), int(warmup_iterations)
    if warmup < 0:
        raise BundleInputError(f"lr_warmup_iterations must be >= 0, got {warmup}")
    if total < 1:
        raise BundleInputError(f"training needs at least 1 iteration (max_epochs x epoch_length), got {total}")
    if warmup > total // 2:
        logger.info("lr_warmup_iterations %d cut to %d: half of this run's %d iterations", warmup, total // 2, total)
        warmup = total // 2

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, 1.0 - (step - warmup) / (total - warmup)) ** power

    schedule = LambdaLR(optimizer, factor)
    schedule.total_iterations, schedule.warmup_iterations = total, warmup  # saved with the schedule's state
    return schedule
