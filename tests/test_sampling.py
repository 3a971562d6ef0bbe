"""Training loaders: ``EpochSampler`` (one epoch of draws from a dataset of any size, split between ranks) and
``SeededDraws`` (each draw's augmentation from its own seed, whatever worker loads it), and the trainer's epoch seeds.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import config_files, make_workflow, small_overrides
from monai.data import DataLoader, Dataset
from monai.transforms import RandGaussianNoised

from bundle.data.sampling import EpochSampler, SeededDraws
from bundle.errors import BundleInputError


def test_an_epoch_is_whole_random_passes_over_a_small_dataset():
    sampler = EpochSampler(range(3), num_samples=7, seed=0)
    draws = list(sampler)
    assert len(sampler) == len(draws) == 7
    indices = [index for index, _ in draws]
    assert sorted(indices[:3]) == sorted(indices[3:6]) == [0, 1, 2]  # each pass visits every image once
    assert len({seed for _, seed in draws}) == 7
    assert list(sampler) == draws  # the same epoch draws the same again (resume)
    sampler.set_epoch(1)
    again = list(sampler)
    assert again != draws and sorted(i for i, _ in again[:3]) == [0, 1, 2]


def test_a_large_pool_gives_distinct_images_within_an_epoch():
    indices = [index for index, _ in EpochSampler(range(100), num_samples=40, seed=3)]
    assert len(set(indices)) == 40 and indices != sorted(indices)
    ordered = [index for index, _ in EpochSampler(range(5), num_samples=7, shuffle=False)]
    assert ordered == [0, 1, 2, 3, 4, 0, 1]


def test_seeds_and_streams_are_independent():
    def draws(seed, epoch, stream=0):
        sampler = EpochSampler(range(10), num_samples=20, seed=seed, stream=stream)
        sampler.set_epoch(epoch)
        return {draw_seed for _, draw_seed in sampler}

    # seed + epoch would make seed 1's epoch 0 repeat seed 0's epoch 1
    assert draws(1, 0).isdisjoint(draws(0, 1)) and draws(0, 0).isdisjoint(draws(1, 0))
    assert draws(0, 0).isdisjoint(draws(0, 0, stream=1))


def test_ranks_take_interleaved_draws_of_one_sequence():
    whole = list(EpochSampler(range(5), num_samples=8, seed=2, num_replicas=1, rank=0))
    parts = [list(EpochSampler(range(5), num_samples=4, seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert Counter(i for i, _ in parts[0] + parts[1]) == Counter(i for i, _ in whole)


def test_bad_sampler_settings_are_input_errors():
    with pytest.raises(BundleInputError, match="num_samples=0"):
        EpochSampler(range(3), num_samples=0)
    with pytest.raises(BundleInputError, match="rank 2 is outside a world of 2"):
        EpochSampler(range(3), num_samples=2, num_replicas=2, rank=2)
    assert list(EpochSampler([], num_samples=4)) == []


def _batches(num_workers: int, epochs: int = 2) -> list[torch.Tensor]:
    dataset = Dataset([{"image": np.zeros((1, 2, 2), np.float32)} for _ in range(5)], RandGaussianNoised("image", 1.0))
    sampler = EpochSampler(dataset, num_samples=6, seed=0)
    loader = DataLoader(
        SeededDraws(dataset), sampler=sampler, batch_size=3, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [batch["image"].as_tensor().clone() for batch in loader]
    return out


def test_augmentations_do_not_depend_on_the_worker_processes():
    in_process, workers = _batches(0), _batches(2)
    assert len(in_process) == len(workers) == 4
    for a, b in zip(in_process, workers, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(in_process[0], in_process[2])  # epochs differ
    # a plain index keeps the transforms' own state (validation, other samplers)
    dataset = SeededDraws(Dataset([{"image": np.zeros((1, 2, 2), np.float32)}], RandGaussianNoised("image", 1.0)))
    assert len(dataset) == 1 and not torch.allclose(dataset[0]["image"], dataset[0]["image"])


def test_the_trainer_seeds_no_two_epochs_of_two_seeds_alike(tmp_path, synthetic_dir):
    streams = {}
    for seed in (0, 1):
        workflow = make_workflow(config_files(), **small_overrides(tmp_path / str(seed), synthetic_dir, seed=seed))
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        for epoch in (1, 2, 3):
            trainer.state.epoch = epoch
            trainer._start_epoch(trainer)
            draws = tuple(trainer.data_loader.sampler)
            streams[seed, epoch] = (tuple(torch.rand(4).tolist()), draws)
            assert trainer.data_loader.sampler.epoch == epoch
            trainer._next_unlabeled()
            assert trainer.unlabeled_data_loader.sampler.epoch == epoch * 1000  # see trainer._UNLABELED_EPOCHS...
    values = list(streams.values())
    assert all(a[0] != b[0] and a[1] != b[1] for i, a in enumerate(values) for b in values[i + 1 :])
