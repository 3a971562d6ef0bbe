"""Pixel metrics and GlaS object-level metrics on hand-built masks (values computed by hand) and on a real GlaS mask."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from monai.networks.utils import one_hot
from PIL import Image
from scipy import ndimage

from bundle.errors import BundleInputError
from bundle.evaluation import (
    ObjectStats,
    boundary_hd95,
    combine_object_stats,
    label_objects,
    object_dice,
    object_f1,
    object_hausdorff,
    object_stats,
    pixel_metrics,
    to_class_map,
)


def box(mask: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], value: int = 1) -> np.ndarray:
    """Set the inclusive rectangle rows[0]..rows[1] x cols[0]..cols[1] of ``mask`` to ``value``."""
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value
    return mask


def blank(height: int = 20, width: int = 20) -> np.ndarray:
    return np.zeros((height, width), dtype=np.int64)


def approx(value: float) -> pytest.approx:
    return pytest.approx(value, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------- pixel metrics


def test_pixel_metrics_binary_by_hand():
    label = box(blank(4, 4), (0, 1), (0, 1))  # 4 gland pixels
    pred = box(blank(4, 4), (0, 1), (0, 2))  # 6 gland pixels, 4 of them correct
    metrics = pixel_metrics(pred[None], label[None], num_classes=2)
    # gland: Dice 2*4/(6+4) = 0.8, Jaccard 4/6
    assert metrics.dice == approx(0.8)
    assert metrics.jaccard == approx(4 / 6)
    # background: 12 label pixels, 10 predicted, 10 shared: Dice 20/22, Jaccard 10/12
    assert metrics.per_class_dice == (approx(20 / 22), approx(0.8))
    assert metrics.mdice == approx((20 / 22 + 0.8) / 2)
    assert metrics.mjaccard == approx((10 / 12 + 4 / 6) / 2)
    # every pixel is a boundary pixel; the predicted column 2 is 1 pixel from the label, all others 0:
    # prediction -> label distances [0, 0, 0, 0, 1, 1], 95th percentile 1; label -> prediction all 0
    assert metrics.hd95 == approx(1.0)


def test_hd95_is_a_percentile_not_the_maximum():
    label = box(blank(), (0, 0), (0, 19))  # a line along the top row: 20 boundary pixels
    pred = label.copy()
    pred[10, 0] = pred[10, 19] = 1  # two stray pixels 10 rows below the line
    # prediction -> label: 20 zeros and two 10s; 95th percentile of 22 sorted values sits at position
    # 0.95 * 21 = 19.95, between sorted[19] = 0 and sorted[20] = 10: 0.95 * 10 = 9.5. label -> prediction: zeros.
    assert boundary_hd95(pred > 0, label > 0) == approx(9.5)
    assert pixel_metrics(pred, label, 2).hd95 == approx(9.5)
    # one stray pixel: 21 values, position 19 -> sorted[19] = 0
    pred[10, 19] = 0
    assert boundary_hd95(pred > 0, label > 0) == approx(0.0)


def test_pixel_metrics_empty_cases():
    empty = blank(4, 4)
    gland = box(blank(4, 4), (0, 1), (0, 1))
    # no gland anywhere: every class absent or perfect -> 1; hd95 0 by convention
    both = pixel_metrics(empty, empty, 2)
    assert (both.dice, both.jaccard, both.mdice, both.mjaccard, both.hd95) == (1.0, 1.0, 1.0, 1.0, 0.0)
    # gland missed: gland Dice 0; background 12 of 16 predicted pixels right: Dice 24/28, Jaccard 12/16;
    # hd95 = image diagonal sqrt(4**2 + 4**2) (worst case)
    missed = pixel_metrics(empty, gland, 2)
    assert (missed.dice, missed.jaccard) == (0.0, 0.0)
    assert missed.mdice == approx(24 / 28 / 2)
    assert missed.mjaccard == approx(12 / 16 / 2)
    assert missed.hd95 == approx(math.sqrt(32))
    # gland predicted on a gland-free image: the same, mirrored
    spurious = pixel_metrics(gland, empty, 2)
    assert (spurious.dice, spurious.hd95) == (0.0, approx(math.sqrt(32)))
    assert spurious.mdice == approx(24 / 28 / 2)


def test_pixel_metrics_three_classes_by_hand():
    label = np.array([[0, 1, 1, 0], [0, 2, 2, 0]])
    pred = np.array([[0, 1, 0, 0], [0, 2, 2, 2]])
    metrics = pixel_metrics(pred, label, 3)
    # class 0: label {(0,0),(0,3),(1,0),(1,3)}, pred {(0,0),(0,2),(0,3),(1,0)}: 3 shared -> Dice 6/8, Jaccard 3/5
    # class 1: label 2 pixels, pred 1, 1 shared -> Dice 2/3, Jaccard 1/2
    # class 2: label 2 pixels, pred 3, 2 shared -> Dice 4/5, Jaccard 2/3
    assert metrics.per_class_dice == (approx(0.75), approx(2 / 3), approx(0.8))
    assert metrics.dice == approx((2 / 3 + 0.8) / 2)  # foreground classes only
    assert metrics.jaccard == approx((0.5 + 2 / 3) / 2)
    assert metrics.mdice == approx((0.75 + 2 / 3 + 0.8) / 3)
    assert metrics.mjaccard == approx((0.6 + 0.5 + 2 / 3) / 3)


def test_class_absent_from_both_scores_one():
    label = np.array([[0, 1, 1, 1]])
    pred = np.array([[0, 0, 1, 1]])
    metrics = pixel_metrics(pred, label, 3)  # class 2 appears nowhere
    # class 0: 1 vs 2 pixels, 1 shared -> 2/3; class 1: 3 vs 2, 2 shared -> 4/5; class 2: absent -> 1
    assert metrics.per_class_dice == (approx(2 / 3), approx(0.8), 1.0)
    assert metrics.dice == approx((0.8 + 1.0) / 2)
    assert metrics.mdice == approx((2 / 3 + 0.8 + 1.0) / 3)
    # class 2 hd95 is 0 (absent from both); class 1 boundary distances: pixel (0,1) is 1 from the prediction
    # (label -> prediction [1, 0, 0], 95th percentile 0.9); prediction -> label [0, 0]
    assert metrics.hd95 == approx((0.9 + 0.0) / 2)


def test_one_hot_and_class_map_inputs_agree():
    label = box(blank(6, 6), (1, 3), (1, 4))
    pred = box(blank(6, 6), (2, 4), (1, 4))
    as_maps = pixel_metrics(torch.from_numpy(pred)[None], torch.from_numpy(label)[None].float(), 2)
    as_one_hot = pixel_metrics(
        one_hot(torch.from_numpy(pred)[None, None], 2)[0], one_hot(torch.from_numpy(label)[None, None], 2)[0], 2
    )
    assert as_maps == as_one_hot
    assert to_class_map(one_hot(torch.from_numpy(pred)[None, None], 2)[0]).tolist() == pred.tolist()


def test_pixel_metrics_reject_bad_input():
    with pytest.raises(BundleInputError, match="class indices 0..2; expected 0..1"):
        pixel_metrics(np.array([[0, 2]]), np.array([[0, 1]]), 2)
    with pytest.raises(BundleInputError, match="size"):
        pixel_metrics(blank(4, 4), blank(4, 5), 2)
    with pytest.raises(BundleInputError, match="non-integer"):
        pixel_metrics(np.array([[0.5, 1.0]]), np.array([[0, 1]]), 2)


# ---------------------------------------------------------------------------------------------- object metrics
# Two ground-truth glands used below: G1 rows 2-5 x cols 2-7 (24 px), G2 rows 10-17 x cols 10-14 (40 px)


def two_glands() -> np.ndarray:
    return box(box(blank(), (2, 5), (2, 7), 1), (10, 17), (10, 14), 2)


def test_perfect_match():
    gt = two_glands()
    stats = object_stats(label_objects(gt), gt)
    assert (stats.tp, stats.fp, stats.fn, stats.gt_objects, stats.pred_objects) == (2, 0, 0, 2, 2)
    assert (stats.f1, stats.dice, stats.hausdorff) == (1.0, 1.0, 0.0)


def test_missed_object():
    gt = two_glands()
    pred = label_objects(gt == 1)  # G2 is missed
    stats = object_stats(pred, gt)
    # TP 1 (G1), FN 1 (G2): F1 = 2 / (2 + 0 + 1)
    assert (stats.tp, stats.fp, stats.fn) == (1, 0, 1)
    assert stats.f1 == approx(2 / 3)
    # segmented side: S1 = G1, Dice 1, weight 1. Ground-truth side: G1 Dice 1 (weight 24/64), G2 no partner,
    # Dice 0 (weight 40/64) -> 0.375. Object Dice = (1 + 0.375) / 2
    assert stats.dice == approx(0.6875)
    # Hausdorff: S1-G1 0. G2 overlaps nothing -> nearest segmented object S1:
    # G2 -> S1: farthest G2 pixel (17,14) to S1's corner (5,7): sqrt(12^2 + 7^2) = sqrt(193);
    # S1 -> G2: farthest S1 pixel (2,2) to G2's corner (10,10): sqrt(128). H = sqrt(193).
    # ground-truth side = 40/64 * sqrt(193); segmented side 0
    assert stats.hausdorff == approx(0.5 * 40 / 64 * math.sqrt(193))


def test_false_positive_uses_nearest_object():
    gt = two_glands()
    pred = box(gt.copy(), (0, 1), (16, 19), 3)  # extra object S3 rows 0-1 x cols 16-19 (8 px), overlaps nothing
    stats = object_stats(label_objects(pred), gt)
    # TP 2, FP 1: F1 = 4 / (4 + 1)
    assert (stats.tp, stats.fp, stats.fn) == (2, 1, 0)
    assert stats.f1 == approx(0.8)
    # segmented side: (24 * 1 + 40 * 1 + 8 * 0) / 72 = 8/9; ground-truth side 1
    assert stats.dice == approx(0.5 * (8 / 9 + 1))
    # S3's nearest ground-truth object by Hausdorff distance:
    #   G1: G1 -> S3 farthest (5,2) to (1,16): sqrt(4^2 + 14^2) = sqrt(212); S3 -> G1 (0,19) to (2,7): sqrt(148)
    #   G2: G2 -> S3 farthest (17,10) to (1,16): sqrt(16^2 + 6^2) = sqrt(292); S3 -> G2: sqrt(125)
    # -> G1 with sqrt(212). Segmented side = 8/72 * sqrt(212); ground-truth side 0
    assert stats.hausdorff == approx(0.5 * 8 / 72 * math.sqrt(212))


def test_split_object():
    gt = box(blank(), (4, 11), (4, 11))  # G: 8x8 = 64 px
    pred = box(box(blank(), (4, 11), (4, 8), 1), (4, 11), (10, 11), 2)  # S1 8x5 = 40 px, S2 8x2 = 16 px
    stats = object_stats(pred, gt)
    # S1 covers 40/64 > 0.5 -> TP; S2 covers 16/64 -> FP. F1 = 2 / (2 + 1)
    assert (stats.tp, stats.fp, stats.fn) == (1, 1, 0)
    assert stats.f1 == approx(2 / 3)
    # Dice(G, S1) = 80/104, Dice(G, S2) = 32/80. Segmented side (40 * 80/104 + 16 * 0.4) / 56;
    # ground-truth side: G's partner is S1 -> 80/104
    assert stats.dice == approx(0.5 * ((40 * 80 / 104 + 16 * 0.4) / 56 + 80 / 104))
    # H(G, S1) = 3 (column 11 to column 8), H(G, S2) = 6 (column 4 to column 10)
    # segmented side (40 * 3 + 16 * 6) / 56, ground-truth side 3
    assert stats.hausdorff == approx(0.5 * ((40 * 3 + 16 * 6) / 56 + 3))


def test_merged_objects():
    gt = box(box(blank(), (2, 7), (2, 5), 1), (2, 7), (8, 13), 2)  # G1 6x4 = 24 px, G2 6x6 = 36 px
    pred = box(blank(), (2, 7), (2, 13))  # S covers both and the gap: 6x12 = 72 px
    stats = object_stats(pred, gt)
    # S's partner is G2 (36 > 24 shared pixels), covered entirely -> TP; G1 is missed. F1 = 2 / (2 + 0 + 1)
    assert (stats.tp, stats.fp, stats.fn) == (1, 0, 1)
    assert stats.f1 == approx(2 / 3)
    # segmented side: Dice(G2, S) = 72/108; ground-truth side: Dice(G1, S) = 48/96 (weight 24/60),
    # Dice(G2, S) = 72/108 (weight 36/60)
    assert stats.dice == approx(0.5 * (72 / 108 + (24 * 0.5 + 36 * 72 / 108) / 60))
    # H(G2, S) = 6 (column 2 to column 8); H(G1, S) = 8 (column 13 to column 5)
    assert stats.hausdorff == approx(0.5 * (6 + (24 * 8 + 36 * 6) / 60))


def test_less_than_half_overlap_is_a_false_positive():
    gt = box(blank(), (2, 9), (2, 9))  # 64 px
    third = box(blank(), (2, 9), (2, 4))  # covers 24/64
    stats = object_stats(third, gt)
    assert (stats.tp, stats.fp, stats.fn, stats.f1) == (0, 1, 1, 0.0)
    # Dice 48/88 on both sides; Hausdorff 5 (column 9 to column 4) on both sides
    assert stats.dice == approx(48 / 88)
    assert stats.hausdorff == approx(5.0)
    # exactly half is not enough either (the official test is "> 0.5")
    half = box(blank(), (2, 9), (2, 5))
    assert object_stats(half, gt).tp == 0
    just_over = half.copy()
    just_over[2, 6] = 1
    assert object_stats(just_over, gt).tp == 1


def test_nearest_object_is_nearest_by_hausdorff_distance():
    pred = blank()
    pred[10, 0] = 1  # S: one pixel
    gt = blank()
    gt[10, 2:20] = 1  # G1: an 18-pixel bar starting 2 pixels from S: H(S, G1) = 19 (its far end)
    gt[16, 0] = 2  # G2: one pixel 6 below S: H(S, G2) = 6
    gt[0:2, 15:20] = 3  # G3: 10 px; G3 -> S farthest (0,19): sqrt(100 + 361); S -> G3 (1,15): sqrt(306)
    stats = object_stats(pred, gt)
    assert (stats.tp, stats.fp, stats.fn, stats.f1, stats.dice) == (0, 1, 3, 0.0, 0.0)
    # the nearest object by distance is G1 (2 px away) but by Hausdorff distance G2 (6): segmented side 6.
    # ground-truth side: each object's nearest segmented object is S: (18 * 19 + 1 * 6 + 10 * sqrt(461)) / 29
    assert stats.hausdorff == approx(0.5 * (6 + (18 * 19 + 6 + 10 * math.sqrt(461)) / 29))


def test_instance_masks_separate_touching_glands():
    instances = box(box(blank(), (2, 7), (2, 6), 1), (2, 7), (7, 11), 2)  # two touching 6x5 glands (30 px each)
    pred = box(box(blank(), (2, 7), (2, 5), 1), (2, 7), (8, 11), 2)  # two 6x4 objects (24 px each)
    # instances: each segmented object covers 24/30 of its gland -> 2 TP. Dice 48/54 everywhere; each pair's
    # Hausdorff distance is 1 (the gland's column next to the gap)
    with_instances = object_stats(pred, instances)
    assert (with_instances.tp, with_instances.fp, with_instances.fn, with_instances.f1) == (2, 0, 0, 1.0)
    assert with_instances.dice == approx(48 / 54)
    assert with_instances.hausdorff == approx(1.0)
    # connected components of the binary mask merge the glands into one 60-pixel object: each segmented
    # object covers 24/60 -> 2 FP, 1 FN. Dice(G, S) = 48/84 for both; the gland's partner on a tie (24 vs 24) is
    # the smallest label S1. H(G, S1) = H(G, S2) = 6
    components = object_stats(pred, label_objects(instances > 0))
    assert (components.tp, components.fp, components.fn, components.f1) == (0, 2, 1, 0.0)
    assert components.dice == approx(48 / 84)
    assert components.hausdorff == approx(6.0)


def test_empty_images_follow_the_official_code():
    empty = blank()
    both = object_stats(empty, empty)
    assert (both.tp, both.fp, both.fn, both.f1, both.dice, both.hausdorff) == (0, 0, 0, 1.0, 1.0, 0.0)
    gt = two_glands()
    missed = object_stats(empty, gt)
    assert (missed.tp, missed.fp, missed.fn, missed.f1, missed.dice) == (0, 0, 2, 0.0, 0.0)
    assert missed.hausdorff == math.inf
    spurious = object_stats(label_objects(gt), empty)
    assert (spurious.tp, spurious.fp, spurious.fn, spurious.f1, spurious.dice) == (0, 2, 0, 0.0, 0.0)
    assert spurious.hausdorff == math.inf


def test_single_metric_helpers_and_instance_ids():
    gt = two_glands() * 7  # arbitrary instance ids (7, 14) are renumbered
    pred = label_objects(gt == 7)
    assert object_f1(pred, gt) == approx(2 / 3)
    assert object_dice(pred, gt) == approx(0.6875)
    assert object_hausdorff(pred, gt) == approx(0.5 * 40 / 64 * math.sqrt(193))
    with pytest.raises(BundleInputError, match="negative"):
        object_stats(pred, -gt)


def test_contest_pooling_differs_from_per_image_means():
    gt = two_glands()
    perfect = object_stats(label_objects(gt), gt)
    missed = object_stats(label_objects(gt == 1), gt)
    pooled = combine_object_stats([perfect, missed])
    # F1 from summed counts: TP 3, FP 0, FN 1 -> 6/7 (the mean of the images' F1 would be 5/6)
    assert (pooled.tp, pooled.fp, pooled.fn) == (3, 0, 1)
    assert pooled.f1 == approx(6 / 7)
    # Dice pooled over all objects: ground-truth side (64 + 24) / 128, segmented side (64 + 24) / 88
    assert pooled.dice == approx(0.5 * (88 / 128 + 1.0))
    # Hausdorff: ground-truth side (0 + 40 * sqrt(193)) / 128, segmented side 0
    assert pooled.hausdorff == approx(0.5 * 40 * math.sqrt(193) / 128)
    # an image with glands and no segmented object makes the part's object Hausdorff infinite
    assert combine_object_stats([perfect, object_stats(blank(), gt)]).hausdorff == math.inf
    empty = combine_object_stats([])
    assert isinstance(empty, ObjectStats) and (empty.f1, empty.dice, empty.hausdorff) == (1.0, 1.0, 0.0)


def test_connectivity():
    diagonal = np.eye(4, dtype=np.int64)
    assert label_objects(diagonal).max() == 1  # 8-connectivity (GlaS default)
    assert label_objects(diagonal, connectivity=1).max() == 4


# ---------------------------------------------------------------------------------------------- real GlaS mask


@pytest.fixture(scope="module")
def glas_mask(glas_dir) -> np.ndarray:
    return (np.array(Image.open(glas_dir / "masks" / "testA_1.png")) > 0).astype(np.int64)


def monai_hd95(pred: np.ndarray, label: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onehot = [one_hot(torch.from_numpy(x.astype(np.int64))[None, None], 2) for x in (pred, label)]
        return float(compute_hausdorff_distance(*onehot, percentile=95)[0, 0])


def test_real_mask_prediction_equals_ground_truth(glas_mask):
    pixels = pixel_metrics(glas_mask, glas_mask, 2)
    assert (pixels.dice, pixels.jaccard, pixels.mdice, pixels.mjaccard, pixels.hd95) == (1.0, 1.0, 1.0, 1.0, 0.0)
    objects = label_objects(glas_mask)
    stats = object_stats(objects, objects)
    assert stats.gt_objects == stats.tp == objects.max() > 5
    assert (stats.f1, stats.dice, stats.hausdorff) == (1.0, 1.0, 0.0)


def test_real_mask_eroded_prediction(glas_mask):
    eroded = ndimage.binary_erosion(glas_mask, iterations=3).astype(np.int64)
    pixels = pixel_metrics(eroded, glas_mask, 2)
    assert 0.9 < pixels.dice < 1.0 and pixels.jaccard < pixels.dice
    # 3 erosions with the 4-connected cross move every boundary by 3 pixels along the axes
    assert pixels.hd95 == approx(3.0)
    assert pixels.hd95 == approx(monai_hd95(eroded, glas_mask))
    stats = object_stats(label_objects(eroded), label_objects(glas_mask))
    assert stats.f1 >= 0.9
    assert 0.9 < stats.dice < 1.0
    # every gland keeps its partner; the farthest pixel of a gland is at least 3 pixels from its eroded partner
    # (more at corners and where thin parts vanish), far less than the glands' sizes
    assert (stats.tp, stats.fp, stats.fn) == (stats.gt_objects, 0, 0)
    assert 3.0 <= stats.hausdorff < 10.0


def test_real_mask_hd95_equals_monai(glas_mask):
    shifted = np.roll(glas_mask, (9, -14), axis=(0, 1))
    assert boundary_hd95(shifted > 0, glas_mask > 0) == pytest.approx(monai_hd95(shifted, glas_mask), rel=1e-5)


def test_pooled_scores_from_summed_counts():
    from bundle.evaluation.pixel_metrics import pooled_scores

    # background absent everywhere (scores 1); gland: 5 pixels in both of 10 predicted and 10 labelled
    scores = pooled_scores(np.array([[0, 0, 0], [5, 10, 10]]))
    assert scores == {"pooled_dice": 0.5, "pooled_jaccard": 5 / 15, "pooled_mdice": 0.75, "pooled_mjaccard": 2 / 3}
    # pooling is not averaging: a small image's perfect score weighs by its pixels, not as one image
    small_perfect, large_half = np.array([[0, 0, 0], [1, 1, 1]]), np.array([[0, 0, 0], [50, 100, 100]])
    assert pooled_scores(small_perfect + large_half)["pooled_dice"] == pytest.approx(2 * 51 / (101 + 101))
