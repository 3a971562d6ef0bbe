"""Pieces for multi-GPU training with ``torchrun`` (``configs/multi_gpu_train.json``).

``DistributedDataParallel`` averages the network's gradients (:func:`ddp_module` prepares the network for it);
:class:`GradientAllReduce` starts the learnable parameters outside the network (the criterion's prompt context vectors
and projection) from rank 0's values and averages their gradients; :func:`rank_shard` gives each rank its own part of
the unlabelled pool to cache; and
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
from ignite.engine import Engine, Events
from monai.data import partition_dataset
from monai.engines.utils import IterationEvents
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "EVERY_RANK_HANDLERS",
    "GradientAllReduce",
    "ddp_module",
    "handlers_for_rank",
    "rank",
    "rank_shard",
    "world_size",
]

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


def ddp_module(
    network: nn.Module, criterion: nn.Module, device: str | torch.device, sync_batchnorm: bool = False
) -> nn.Module:
    """The network ready to be wrapped in ``DistributedDataParallel``: on ``device``, with ``SyncBatchNorm`` when
    asked, and its projection head frozen when no loss term reads the embeddings (``criterion.needs_embedding`` is
    False: the supervised and unimatch presets). Every trainable parameter then gets a gradient in every iteration,
    so DDP runs without ``find_unused_parameters`` (which costs a traversal of the graph per iteration)."""
    if not getattr(criterion, "needs_embedding", True) and hasattr(network, "projection_head"):
        network.projection_head.requires_grad_(False)
    if sync_batchnorm:
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return network.to(device)


def rank_shard(items: Sequence, seed: int = 0) -> list:
    """This rank's part of a datalist (all of it in a single process), so that each rank caches only its part.

    MONAI's ``partition_dataset`` with a seeded shuffle and even parts (short parts repeat an item), so every
    rank draws from a non-empty part of about the same size; an empty list stays empty on every rank.
    """
    items = list(items)
    if world_size() == 1 or not items:
        return items
    return partition_dataset(items, num_partitions=world_size(), shuffle=True, seed=seed, even_divisible=True)[rank()]


class GradientAllReduce:
    """Average the gradients of ``modules``' trainable parameters over all ranks after every backward pass, and
    start them from rank 0's values when training starts.

    For parameters that ``DistributedDataParallel`` does not hold: their initial values match across ranks only
    as far as every rank's random initialisation does, so they are broadcast like DDP broadcasts the network's
    (after a resumed checkpoint is loaded: attach this handler after the checkpoint loader). A parameter without
    a gradient on this rank takes part with zeros, so every rank sends the same tensors in the same order. A no-op
    in a single process.
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
        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @torch.no_grad()
    def broadcast(self, _engine: Engine | None = None) -> None:
        """Copy rank 0's trainable parameters of ``modules`` to every rank (frozen ones, such as a text encoder, are
        loaded from the same file everywhere)."""
        if world_size() == 1:
            return
        for param in self.parameters():
            dist.broadcast(param.data, src=0)

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
