"""Pieces for multi-GPU training with ``torchrun`` (``configs/multi_gpu_train.json``).

``DistributedDataParallel`` averages the network's gradients; :class:`GradientAllReduce` does the same for the
learnable parameters outside the network (the criterion's prompt context vectors and projection), and
:func:`handlers_for_rank` keeps console, TensorBoard and log-file output on rank 0 while every rank keeps the
handlers that take part in collective operations or change training: LR schedule, resume, gradient averaging,
validation (each rank validates a shard; MONAI's metrics gather the results) and the checkpoint saver (ignite's
``DiskSaver`` writes on rank 0 only but must be created on every rank). The image prototype bank all-reduces its
own per-class sums (:mod:`bundle.losses.prototype_bank`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["EVERY_RANK_HANDLERS", "GradientAllReduce", "handlers_for_rank", "rank", "world_size"]

# handler classes every rank needs (see the module docstring)
EVERY_RANK_HANDLERS = (
    "LrScheduleHandler",
    "ValidationHandler",
    "TrainingCheckpointLoader",
    "TrainingCheckpointSaver",
    "GradientAllReduce",
)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def handlers_for_rank(handlers: Sequence, every_rank: Iterable[str] = EVERY_RANK_HANDLERS) -> list:
    """All ``handlers`` on rank 0 (or without torch.distributed); on other ranks only the ``every_rank`` classes."""
    if rank() == 0:
        return list(handlers)
    keep = set(every_rank)
    return [handler for handler in handlers if type(handler).__name__ in keep]


class GradientAllReduce:
    """Average the gradients of ``modules``' trainable parameters over all ranks after every backward pass.

    For parameters that ``DistributedDataParallel`` does not hold. A parameter without a gradient on this rank
    takes part with zeros, so every rank sends the same tensors in the same order. A no-op in a single process.
    """

    def __init__(self, modules: Sequence[nn.Module | None]) -> None:
        self.modules = [module for module in modules if module is not None]

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for module in self.modules:
            for param in module.parameters():
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        return params

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, _engine: Engine | None = None) -> None:
        size = world_size()
        params = self.parameters()
        if size == 1 or not params:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= size
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)
