"""Tests of the CutMix component: box statistics against UniMatch's sampler, probabilities, consistent mixing of
images, pseudo-labels, confidences and ignore masks with the same boxes, rolled sources, purity and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.engine.cutmix import CutMix, roll_source
from bundle.errors import BundleInputError


def _box_extents(boxes: torch.Tensor) -> torch.Tensor:
    """[N, 4] (top, left, height, width) of the non-empty boxes, checking that each is one filled rectangle."""
    rows, cols = boxes.any(dim=2), boxes.any(dim=1)
    height, width = rows.sum(1), cols.sum(1)
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    filled = boxes.sum((1, 2)) == height * width
    contiguous_rows = (rows.shape[1] - 1 - rows.flip(1).float().argmax(1)) - top + 1 == height
    contiguous_cols = (cols.shape[1] - 1 - cols.flip(1).float().argmax(1)) - left + 1 == width
    present = height > 0
    assert bool((filled & contiguous_rows & contiguous_cols)[present].all())
    return torch.stack([top, left, height, width], dim=1)[present]


def _unimatch_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """UniMatch's ``obtain_cutmix_box`` (p=1, area 0.02-0.4, ratio 0.3-1/0.3), generalised to H != W."""
    size = rng.uniform(0.02, 0.4) * height * width
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        cutmix_w, cutmix_h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        x, y = rng.integers(0, width), rng.integers(0, height)
        if x + cutmix_w <= width and y + cutmix_h <= height:
            return y, x, cutmix_h, cutmix_w


def _box_statistics(extents: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left, box_h, box_w = extents.T.astype(np.float64)
    area = box_h * box_w / (height * width)
    log_ratio = np.log(box_h / box_w)
    centre_y, centre_x = (top + box_h / 2) / height, (left + box_w / 2) / width
    return np.array([area.mean(), area.std(), log_ratio.mean(), log_ratio.std(), centre_y.std(), centre_x.std()])


@pytest.mark.parametrize("size", [(64, 64), (48, 96)])
def test_box_distribution_matches_unimatch_reference(size):
    height, width = size
    rng = np.random.default_rng(0)
    reference = np.array([_unimatch_box(height, width, rng) for _ in range(3000)])
    ours = _box_extents(CutMix(prob=1.0).sample_boxes(3000, height, width, generator=torch.Generator().manual_seed(1)))
    difference = np.abs(_box_statistics(ours.numpy(), height, width) - _box_statistics(reference, height, width))
    assert np.all(difference < [0.01, 0.01, 0.05, 0.04, 0.015, 0.015]), difference


@pytest.mark.parametrize("size", [(64, 64), (48, 96)])
def test_box_area_and_aspect_ratio_follow_unimatch(size):
    height, width = size
    cutmix = CutMix(prob=1.0)
    boxes = cutmix.sample_boxes(3000, height, width, generator=torch.Generator().manual_seed(0))
    assert boxes.dtype == torch.bool and tuple(boxes.shape) == (3000, height, width)
    top, left, box_h, box_w = _box_extents(boxes).T
    assert len(top) == 3000
    areas = (box_h * box_w).double() / (height * width)
    ratios = box_h.double() / box_w.double()
    assert bool((top + box_h <= height).all()) and bool((left + box_w <= width).all())
    # int() truncation of sqrt(area * ratio) and sqrt(area / ratio) only shrinks boxes: areas stay <= 0.4
    assert float(areas.max()) <= 0.4 + 1e-9
    assert float(areas.min()) >= 0.02 * 0.5  # truncation of both sides at this size loses less than half
    assert 0.3 * 0.7 <= float(ratios.min()) and float(ratios.max()) <= (1 / 0.3) / 0.7
    # the area is drawn once per box (U(0.02, 0.4), mean 0.21); only ratio and corner are redrawn until the box
    # fits, so the mean stays 0.21 minus the truncation loss
    assert 0.17 < float(areas.mean()) < 0.21
    # boxes reach every edge of the image
    assert int(top.min()) == 0 and int(left.min()) == 0
    assert int((top + box_h).max()) == height and int((left + box_w).max()) == width


def test_prob_zero_gives_no_boxes_and_prob_one_gives_all():
    generator = torch.Generator().manual_seed(1)
    assert not bool(CutMix(prob=0.0).sample_boxes(50, 32, 32, generator=generator).any())
    boxes = CutMix(prob=1.0).sample_boxes(200, 32, 32, generator=generator)
    assert bool(boxes.flatten(1).any(dim=1).all())


def test_prob_half_gives_about_half():
    boxes = CutMix(prob=0.5).sample_boxes(2000, 32, 32, generator=torch.Generator().manual_seed(2))
    fraction = float(boxes.flatten(1).any(dim=1).float().mean())
    assert 0.45 < fraction < 0.55


def test_unfittable_boxes_are_clipped_inside_the_image():
    cutmix = CutMix(prob=1.0, area=(0.9, 0.9), aspect_ratio=(20.0, 20.0), max_tries=5)  # h = 4.2 * size: never fits
    boxes = cutmix.sample_boxes(16, 20, 30, generator=torch.Generator().manual_seed(3))
    top, left, height, width = _box_extents(boxes).T
    assert len(top) == 16 and bool((height == 20).all()) and bool((top == 0).all())
    assert bool((left + width <= 30).all())


def test_mix_all_uses_the_same_boxes_for_every_tensor():
    batch, height, width = 4, 16, 20
    generator = torch.Generator().manual_seed(4)
    # every value identifies its sample: images b + c / 10, labels b, confidences b / 10, ignore b % 2
    ids = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    image = (ids + torch.arange(3).view(1, 3, 1, 1) / 10).expand(batch, 3, height, width).contiguous()
    label = ids[:, 0].expand(batch, height, width).long().contiguous()
    confidence = (ids / 10).expand(batch, 1, height, width).contiguous()
    ignore = (ids[:, 0] % 2).expand(batch, height, width).bool().contiguous()
    targets = {"image": image, "label": label, "confidence": confidence, "ignore": ignore}
    before = {key: value.clone() for key, value in targets.items()}
    cutmix = CutMix(prob=1.0)
    mixed, boxes = cutmix(targets, generator=generator)
    for key, value in targets.items():
        assert torch.equal(value, before[key])  # inputs untouched
        assert mixed[key].shape == value.shape and mixed[key].dtype == value.dtype
    source_id = (torch.arange(batch) - 1) % batch  # rolled by one: sample b takes its box from sample b - 1
    for b in range(batch):
        inside = boxes[b]
        assert bool(inside.any()) and not bool(inside.all())
        for key, value in mixed.items():
            source = int(source_id[b])
            assert torch.equal(_pixels(value, b)[inside], _pixels(before[key], source)[inside])
            assert torch.equal(_pixels(value, b)[~inside], _pixels(before[key], b)[~inside])


def _pixels(batch: torch.Tensor, index: int) -> torch.Tensor:
    """Sample ``index`` as [H, W] or [H, W, C], so that an [H, W] box mask selects its pixels."""
    sample = batch[index]
    return sample.movedim(0, -1) if batch.ndim == 4 else sample


def test_mix_with_explicit_sources_and_hand_made_boxes():
    target = torch.zeros(2, 1, 3, 4)
    source = torch.ones(2, 1, 3, 4)
    boxes = torch.zeros(2, 3, 4, dtype=torch.bool)
    boxes[0, 1:3, 0:2] = True
    mixed = CutMix.mix(boxes, target, source)
    assert mixed[0, 0].tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert not bool(mixed[1].any())
    assert not bool(target.any())  # not modified in place
    out = CutMix().mix_all(boxes, {"x": target[:, 0]}, {"x": source[:, 0]})
    assert torch.equal(out["x"], mixed[:, 0])
    with pytest.raises(ValueError):
        CutMix.mix(boxes, target, torch.ones(2, 1, 3, 5))
    with pytest.raises(ValueError):
        CutMix().mix_all(boxes, {"x": target}, {"y": source})


def test_roll_source_semantics():
    x = torch.arange(4).view(4, 1)
    assert roll_source(x).flatten().tolist() == [3, 0, 1, 2]
    assert roll_source(x, shifts=2).flatten().tolist() == [2, 3, 0, 1]
    rolled = roll_source(x)
    rolled[0] = 99
    assert x.flatten().tolist() == [0, 1, 2, 3]


def test_generator_determinism_and_global_rng():
    cutmix = CutMix(prob=0.5)
    first = cutmix.sample_boxes(32, 24, 24, generator=torch.Generator().manual_seed(7))
    again = cutmix.sample_boxes(32, 24, 24, generator=torch.Generator().manual_seed(7))
    other = cutmix.sample_boxes(32, 24, 24, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(11)
    global_first = cutmix.sample_boxes(32, 24, 24)
    torch.manual_seed(11)
    assert torch.equal(global_first, cutmix.sample_boxes(32, 24, 24))


@pytest.mark.parametrize(
    "options",
    [{"prob": 1.5}, {"area": (0.0, 0.4)}, {"area": (0.5, 0.4)}, {"area": (0.1, 1.2)}, {"aspect_ratio": (0.0, 2.0)}],
)
def test_bad_options_are_input_errors(options):
    with pytest.raises(BundleInputError):
        CutMix(**options)
