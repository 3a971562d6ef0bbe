"""Training loaders that hold exactly one epoch and draw every sample's augmentation from its own seed.

With a handful of labelled images (7 at GlaS 10 %) a shuffling ``DataLoader`` runs dry every iteration or two, and
each restart waits for its worker processes to fill the queue again (or, without ``persistent_workers``, starts new
ones). :class:`EpochSampler` yields ``epoch_length * batch_size`` draws per epoch from a dataset of any size
(successive random passes over it, a different order each epoch), split between the ranks of a distributed run, so
a loader is restarted once per epoch, with persistent workers and a full prefetch queue.

Each draw also carries a seed, and :class:`SeededDraws` sets the random state of the dataset's transforms from it
before loading the sample. A sample's augmentation then depends on ``(seed, epoch, draw)`` only, not on which worker
process loads it or how long that worker has lived, so runs with 0 or 8 persistent workers see the same images and
a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, Sampler

from ..errors import BundleInputError

__all__ = ["EpochSampler", "SeededDraws"]


class EpochSampler(Sampler):
    """``num_samples`` draws ``(index, seed)`` per epoch and rank; call :meth:`set_epoch` at every epoch start.

    Args:
        dataset: the dataset drawn from (its length).
        num_samples: draws per epoch on this rank (``epoch_length * batch_size``).
        shuffle: a random order in every pass over the dataset (else ``0, 1, ..., n-1`` repeated).
        seed: the run's seed; an epoch's draws come from ``(seed, stream, epoch)`` through numpy's ``SeedSequence``,
            so different seeds give independent streams.
        stream: tells apart the samplers of one run (labelled 0, unlabelled 1), which would otherwise draw alike.
        num_replicas, rank: the distributed world (default: from ``torch.distributed`` when it is initialised).
            Ranks take interleaved draws of one sequence, so they never draw the same pass position.
    """

    def __init__(
        self,
        dataset: Sized,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        stream: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = int(
            num_replicas if num_replicas is not None else dist.get_world_size() if distributed else 1
        )
        self.rank = int(rank if rank is not None else dist.get_rank() if distributed else 0)
        if int(num_samples) < 1:
            raise BundleInputError(
                f"a training loader needs at least one draw per epoch, got num_samples={num_samples}"
            )
        if not 0 <= self.rank < self.num_replicas:
            raise BundleInputError(f"rank {self.rank} is outside a world of {self.num_replicas}")
        self.dataset = dataset
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.stream = int(stream)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        size = len(self.dataset)
        if size == 0:
            return iter(())
        total = self.num_samples * self.num_replicas
        state = np.random.SeedSequence([self.seed, self.stream, self.epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        passes = math.ceil(total / size)
        if self.shuffle:
            order = torch.cat([torch.randperm(size, generator=generator) for _ in range(passes)])[:total]
        else:
            order = torch.arange(size).repeat(passes)[:total]
        seeds = torch.randint(0, 2**31 - 1, (total,), generator=generator)
        mine = slice(self.rank, total, self.num_replicas)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist(), strict=True))


class SeededDraws(Dataset):
    """``dataset[(index, seed)]``: ``dataset[index]`` with its transforms' random state set from ``seed`` first.

    A plain integer index loads the sample with the transforms' current state (validation, other samplers).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            index, seed = key
            set_rnd(getattr(self.dataset, "transform", self.dataset), seed=seed)
            return self.dataset[index]
        return self.dataset[key]
