"""Optimizer parameter groups: the network (encoder at its own rate or frozen) plus the loss's learnable prompts."""

from __future__ import annotations

from torch import nn

__all__ = ["optimizer_param_groups"]


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
