"""Object-level metrics of the GlaS challenge: object F1, object Dice and object Hausdorff distance.

Definitions follow Sirinukunwattana et al., "Gland segmentation in colon histology images: The GlaS challenge
contest", Medical Image Analysis 35 (2017), section "Evaluation", the contest's evaluation page and its official
Matlab code (``F1score.m``, ``ObjectDice.m``, ``ObjectHausdorff.m``, ``Hausdorff.m``; K. Sirinukunwattana 2015):

- Objects are labelled regions. Ground-truth objects come from the instance masks when there are any, else from
  connected components; segmented objects from connected components. Connected components use 8-connectivity,
  as ``bwlabel(., 8)`` in the official code.
- Detection: the ground-truth partner of a segmented object ``S`` is the ground-truth object it overlaps most (ties:
  the smallest label, as Matlab's ``mode``). ``S`` is a true positive when it covers *more than* 50 % of that
  partner (``|S & G| / |G| > 0.5``, the official code's strict test; the web page says "at least 50 %"), otherwise a
  false positive. Two disjoint segmented objects cannot both cover more than half of one ground-truth object, so
  each ground-truth object is detected at most once and ``FN = #G - TP``: a ground-truth object is missed unless
  some segmented object covers more than half of it, as the contest page defines it and ``F1score.m`` of
  ``evaluation_v6`` computes it (an older ``F1score.m`` counted only ground-truth objects that are no segmented
  object's partner). ``F1 = 2 TP / (2 TP + FP + FN)``; no objects on either side: 1, on one side only: 0.
- Object Dice: ``0.5 * [sum_i gamma_i Dice(G_i, S*(G_i)) + sum_j sigma_j Dice(G*(S_j), S_j)]`` with area weights
  ``gamma_i = |G_i| / sum |G|`` and ``sigma_j = |S_j| / sum |S|``; ``S*(G_i)`` is the segmented object overlapping
  ``G_i`` most (Dice 0 when none overlaps). No objects on either side: 1; on one side only: 0 (official code).
- Object Hausdorff: the same weighting of the Hausdorff distance between the pixel sets of an object and its
  partner; an object that overlaps nothing is paired with the object of the other side at the smallest Hausdorff
  distance (ties: the smallest label, as Matlab's ``min``). No objects on either side: 0 (the official loops add
  nothing). Objects on one side only: ``inf`` - the official ``Hausdorff.m`` value for a pair with one empty set
  (``ObjectHausdorff.m`` itself fails on that case).
- Over a test part, the contest sums TP/FP/FN over its images for the F1 score and pools the object Dice and
  Hausdorff over *all* objects of the part (the contest page sums over the union of the images' object sets, with
  weights relative to the total object area of the part; S. Graham's GlaS ``compute_stats.py`` does the same). The
  per-image :class:`ObjectStats` keep the sums needed for that; :func:`combine_object_stats` pools them.

Distances are exact Euclidean distances between pixel centres, as the official ``knnsearch`` over all pixels:
the nearest pixel of a set ``B`` to a pixel outside ``B`` is always a pixel of ``B``'s 4-connected boundary, so the
targets are reduced to boundaries (scipy KD-trees) and only the pixels of ``A`` outside ``B`` are queried, or, for
many pixels, a Euclidean distance transform of the window holding both gives the same distances faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
from monai.utils import convert_to_numpy
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential

from ..errors import BundleInputError

__all__ = [
    "GLAS_CONNECTIVITY",
    "ObjectStats",
    "combine_object_stats",
    "f1_from_counts",
    "label_objects",
    "object_dice",
    "object_f1",
    "object_hausdorff",
    "object_stats",
]

# skimage connectivity 2 on a 2-D image = 8-connectivity, as bwlabel(BW, 8) in the official GlaS code
GLAS_CONNECTIVITY = 2
TP_OVERLAP = 0.5


def label_objects(mask, connectivity: int = GLAS_CONNECTIVITY) -> np.ndarray:
    """Connected components (1..n, background 0) of the foreground ``mask > 0`` of a ``[H, W]`` or ``[1, H, W]``
    mask; ``connectivity`` 2 is 8-connectivity, 1 is 4-connectivity."""
    values = _as_2d(mask, "mask")
    return connected_components(values > 0, connectivity=connectivity).astype(np.int64)


def _as_2d(array, what: str) -> np.ndarray:
    values = convert_to_numpy(array)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise BundleInputError(f"{what} must have shape [H, W] or [1, H, W], got {list(values.shape)}")
    return values


def _as_instances(array, what: str) -> np.ndarray:
    """Object labels ``[H, W]`` (0 = background, any other integer = one object) renumbered 1..n in label order."""
    values = _as_2d(array, what)
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind == "f":
        if not np.array_equal(np.rint(values), values):
            raise BundleInputError(f"{what} holds non-integer object labels")
        values = np.rint(values)
    values = values.astype(np.int64)
    if values.size and values.min() < 0:
        raise BundleInputError(f"{what} holds negative object labels (minimum {values.min()}); expected ids >= 0")
    return relabel_sequential(values)[0]


class _Objects:
    """Labelled objects of one image with lazily computed pixels, boundary pixels and boundary KD-trees."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.count = int(labels.max()) if labels.size else 0
        self.slices = ndimage.find_objects(labels, max_label=self.count)
        self._pixels: dict[int, np.ndarray] = {}
        self._boundaries: dict[int, np.ndarray] = {}
        self._trees: dict[int, cKDTree] = {}
        self._all_boundaries: tuple[np.ndarray, np.ndarray] | None = None

    def pixels(self, k: int) -> np.ndarray:
        """(row, column) of every pixel of object ``k``."""
        if k not in self._pixels:
            window = self.slices[k - 1]
            local = np.argwhere(self.labels[window] == k)
            self._pixels[k] = local + np.array([window[0].start, window[1].start])
        return self._pixels[k]

    def boundary(self, k: int) -> np.ndarray:
        """(row, column) of object ``k``'s pixels that have a 4-neighbour outside it."""
        if k not in self._boundaries:
            window = self.slices[k - 1]
            mask = np.pad(self.labels[window] == k, 1)
            edges = mask & ~ndimage.binary_erosion(mask)
            local = np.argwhere(edges) - 1
            self._boundaries[k] = local + np.array([window[0].start, window[1].start])
        return self._boundaries[k]

    def all_boundaries(self) -> tuple[np.ndarray, np.ndarray]:
        """Boundary pixels of objects 1..n one after another, and the index where each object's pixels start."""
        if self._all_boundaries is None:
            boundaries = [self.boundary(k) for k in range(1, self.count + 1)]
            starts = np.cumsum([0] + [len(pixels) for pixels in boundaries[:-1]])
            self._all_boundaries = (np.concatenate(boundaries), starts)
        return self._all_boundaries

    def tree(self, k: int) -> cKDTree:
        if k not in self._trees:
            self._trees[k] = cKDTree(self.boundary(k).astype(np.float64))
        return self._trees[k]


# boundaries up to this size are compared with every query point directly
_SMALL_TARGET = 16
# a KD-tree query costs about this many times more per point than a distance transform per pixel of its window
_QUERY_COST = 12


def _distances(points: np.ndarray, target: _Objects, b: int) -> np.ndarray:
    """Euclidean distances from ``points`` (row, column; none of them inside the object) to ``target``'s object
    ``b``. The nearest pixel of an object to a pixel outside it lies on its boundary; depending on which is cheaper
    the distances come from the boundary pixels directly (small objects), a KD-tree query, or a Euclidean distance
    transform of the window holding points and object (many points)."""
    boundary = target.boundary(b)
    if len(boundary) <= _SMALL_TARGET:
        # squared distances of integer pixel offsets are exact in float32 (below 2**24)
        rows, cols = points[:, 0].astype(np.float32), points[:, 1].astype(np.float32)
        squared = np.full(len(points), np.inf, dtype=np.float32)
        for row, col in boundary:
            np.minimum(squared, np.square(rows - row) + np.square(cols - col), out=squared)
        return np.sqrt(squared.astype(np.float64))
    window = target.slices[b - 1]
    top = min(int(points[:, 0].min()), window[0].start)
    left = min(int(points[:, 1].min()), window[1].start)
    bottom = max(int(points[:, 0].max()) + 1, window[0].stop)
    right = max(int(points[:, 1].max()) + 1, window[1].stop)
    if len(points) * _QUERY_COST < (bottom - top) * (right - left):
        return target.tree(b).query(points.astype(np.float64))[0]
    transform = ndimage.distance_transform_edt(target.labels[top:bottom, left:right] != b)
    return transform[points[:, 0] - top, points[:, 1] - left]


def _directed(points: np.ndarray, target: _Objects, b: int, disjoint: bool = False) -> float:
    """Exact ``max_p min_q |p - q|`` over ``points`` (row, column) and the pixels ``q`` of ``target``'s object ``b``;
    points inside ``b`` contribute 0 (``disjoint=True`` says there are none)."""
    outside = points if disjoint else points[target.labels[points[:, 0], points[:, 1]] != b]
    return float(_distances(outside, target, b).max()) if len(outside) else 0.0


class _PairDistances:
    """Hausdorff distances between segmented and ground-truth objects of one image, each pair computed once."""

    def __init__(self, pred: _Objects, gt: _Objects) -> None:
        self.pred, self.gt = pred, gt
        self._cache: dict[tuple[int, int], float] = {}

    def __call__(self, s: int, g: int) -> float:
        key = (s, g)
        if key not in self._cache:
            self._cache[key] = max(
                _directed(self.pred.pixels(s), self.gt, g), _directed(self.gt.pixels(g), self.pred, s)
            )
        return self._cache[key]

    def disjoint(self, s: int, g: int) -> float:
        """Hausdorff distance of a pair known not to overlap (cached with the others)."""
        key = (s, g)
        if key not in self._cache:
            self._cache[key] = max(
                _directed(self.pred.pixels(s), self.gt, g, disjoint=True),
                _directed(self.gt.pixels(g), self.pred, s, disjoint=True),
            )
        return self._cache[key]

    def nearest(self, fixed: int, fixed_is_pred: bool) -> float:
        """Smallest Hausdorff distance from object ``fixed``, which overlaps no object of the other side, to any
        object of that side; ``inf`` when there is none.

        Candidates are visited in order of a lower bound - the distance from their boundary pixels to ``fixed``,
        and from ``fixed``'s boundary pixels to them (boundaries are subsets of the objects) - and skipped once the
        bound reaches the best exact distance, so the result stays exact."""
        own, other = (self.pred, self.gt) if fixed_is_pred else (self.gt, self.pred)

        def exact(candidate: int) -> float:
            return self.disjoint(fixed, candidate) if fixed_is_pred else self.disjoint(candidate, fixed)

        if other.count <= 2:
            return min((exact(k) for k in range(1, other.count + 1)), default=math.inf)
        points, starts = other.all_boundaries()
        bounds = np.maximum.reduceat(_distances(points, own, fixed), starts)
        if len(own.boundary(fixed)) > _SMALL_TARGET:
            for k in range(1, other.count + 1):
                bounds[k - 1] = max(bounds[k - 1], float(_distances(own.boundary(fixed), other, k).max()))
        best = math.inf
        for index in np.argsort(bounds, kind="stable"):
            if bounds[index] >= best:
                break
            best = min(best, exact(int(index) + 1))
        return best


@dataclass(frozen=True)
class ObjectStats:
    """Object-level counts and area-weighted sums of one image (or, summed, of a set of images).

    ``gt_dice_sum`` is ``sum_i |G_i| Dice(G_i, S*(G_i))`` and ``pred_dice_sum`` ``sum_j |S_j| Dice(G*(S_j), S_j)``;
    likewise for the Hausdorff sums. ``gt_area`` / ``pred_area`` are the summed object areas (the weights' totals).
    """

    tp: int
    fp: int
    fn: int
    gt_objects: int
    pred_objects: int
    gt_area: int
    pred_area: int
    gt_dice_sum: float
    pred_dice_sum: float
    gt_hausdorff_sum: float
    pred_hausdorff_sum: float

    @property
    def f1(self) -> float:
        """Object F1 from the counts (1 when there are no objects at all)."""
        return f1_from_counts(self.tp, self.fp, self.fn)

    @property
    def dice(self) -> float:
        """Object Dice (1 with no objects on either side, 0 with objects on one side only)."""
        if self.gt_area == 0 and self.pred_area == 0:
            return 1.0
        gt_term = self.gt_dice_sum / self.gt_area if self.gt_area else 0.0
        pred_term = self.pred_dice_sum / self.pred_area if self.pred_area else 0.0
        return 0.5 * (gt_term + pred_term)

    @property
    def hausdorff(self) -> float:
        """Object Hausdorff distance in pixels (0 with no objects on either side, inf with objects on one side)."""
        if self.gt_area == 0 and self.pred_area == 0:
            return 0.0
        gt_term = self.gt_hausdorff_sum / self.gt_area if self.gt_area else 0.0
        pred_term = self.pred_hausdorff_sum / self.pred_area if self.pred_area else 0.0
        return 0.5 * (gt_term + pred_term)


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2 TP / (2 TP + FP + FN)``: 1 when all counts are 0 (nothing to detect, nothing detected)."""
    total = 2 * tp + fp + fn
    return 1.0 if total == 0 else 2.0 * tp / total


def object_stats(pred_objects, gt_objects, hausdorff: bool = True) -> ObjectStats:
    """GlaS object statistics of one image.

    ``pred_objects`` and ``gt_objects`` are object label maps ``[H, W]`` / ``[1, H, W]`` (0 background, every other
    value one object; see :func:`label_objects` to get them from a binary mask). With ``hausdorff=False`` the
    Hausdorff sums are NaN (skips the only costly part)."""
    pred_labels = _as_instances(pred_objects, "prediction objects")
    gt_labels = _as_instances(gt_objects, "ground-truth objects")
    if pred_labels.shape != gt_labels.shape:
        raise BundleInputError(f"prediction has size {pred_labels.shape} but its label has size {gt_labels.shape}")
    pred, gt = _Objects(pred_labels), _Objects(gt_labels)
    n_pred, n_gt = pred.count, gt.count

    # overlap table: row = segmented object (0 = background), column = ground-truth object (0 = background)
    table = np.bincount((pred_labels * (n_gt + 1) + gt_labels).ravel(), minlength=(n_pred + 1) * (n_gt + 1))
    table = table.reshape(n_pred + 1, n_gt + 1)
    pred_areas = table[1:].sum(axis=1)
    gt_areas = table[:, 1:].sum(axis=0)
    overlap = table[1:, 1:]

    # partner = most-overlapping object of the other side (np.argmax: first maximum = smallest label), 0 = none
    if n_pred and n_gt:
        pred_partner = np.where(overlap.max(axis=1) > 0, overlap.argmax(axis=1) + 1, 0)
        gt_partner = np.where(overlap.max(axis=0) > 0, overlap.argmax(axis=0) + 1, 0)
    else:
        pred_partner = np.zeros(n_pred, dtype=np.int64)
        gt_partner = np.zeros(n_gt, dtype=np.int64)

    tp = 0
    pred_dice_sum = 0.0
    for j in range(n_pred):
        g = int(pred_partner[j])
        if g:
            inter = overlap[j, g - 1]
            tp += int(inter / gt_areas[g - 1] > TP_OVERLAP)
            pred_dice_sum += pred_areas[j] * 2.0 * inter / (pred_areas[j] + gt_areas[g - 1])
    gt_dice_sum = 0.0
    for i in range(n_gt):
        s = int(gt_partner[i])
        if s:
            inter = overlap[s - 1, i]
            gt_dice_sum += gt_areas[i] * 2.0 * inter / (gt_areas[i] + pred_areas[s - 1])

    if hausdorff:
        distances = _PairDistances(pred, gt)
        pred_hausdorff_sum = 0.0
        for j in range(n_pred):
            g = int(pred_partner[j])
            h = distances(j + 1, g) if g else distances.nearest(j + 1, True)
            pred_hausdorff_sum += pred_areas[j] * h
        gt_hausdorff_sum = 0.0
        for i in range(n_gt):
            s = int(gt_partner[i])
            h = distances(s, i + 1) if s else distances.nearest(i + 1, False)
            gt_hausdorff_sum += gt_areas[i] * h
    else:
        pred_hausdorff_sum = gt_hausdorff_sum = math.nan

    return ObjectStats(
        tp=tp,
        fp=n_pred - tp,
        fn=n_gt - tp,
        gt_objects=n_gt,
        pred_objects=n_pred,
        gt_area=int(gt_areas.sum()),
        pred_area=int(pred_areas.sum()),
        gt_dice_sum=float(gt_dice_sum),
        pred_dice_sum=float(pred_dice_sum),
        gt_hausdorff_sum=float(gt_hausdorff_sum),
        pred_hausdorff_sum=float(pred_hausdorff_sum),
    )


def combine_object_stats(stats: Iterable[ObjectStats]) -> ObjectStats:
    """Pool the statistics of several images the contest's way: counts, areas and weighted sums are added, so
    ``.f1`` is the F1 of the summed TP/FP/FN and ``.dice`` / ``.hausdorff`` weight every object of every image by
    its area relative to the total area of all images."""
    names = [field.name for field in fields(ObjectStats)]
    totals = {name: 0 for name in names}
    for item in stats:
        for name in names:
            totals[name] += getattr(item, name)
    return ObjectStats(**totals)


def object_f1(pred_objects, gt_objects) -> float:
    """Object F1 of one image (official ``F1score.m``)."""
    return object_stats(pred_objects, gt_objects, hausdorff=False).f1


def object_dice(pred_objects, gt_objects) -> float:
    """Object Dice of one image (official ``ObjectDice.m``)."""
    return object_stats(pred_objects, gt_objects, hausdorff=False).dice


def object_hausdorff(pred_objects, gt_objects) -> float:
    """Object Hausdorff distance of one image in pixels (official ``ObjectHausdorff.m``)."""
    return object_stats(pred_objects, gt_objects).hausdorff
