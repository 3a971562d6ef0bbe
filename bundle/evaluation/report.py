"""Evaluation report handler: per-image pixel and GlaS object metrics, per-part summaries, CSV, overlays, table.

Attach :class:`SegmentationReport` to a MONAI ``SupervisedEvaluator`` (``decollate=True``). Each iteration it
computes every metric of every image of the batch and keeps one small row per image, plus the rendered overlay
of the images that are currently among the ``overlay_count`` best or worst by gland Dice; full-resolution
predictions are never accumulated. When the evaluator completes it writes, in ``output_dir``:

- ``metrics.json``: ``{"overall": {...}, "parts": {"testA": {...}, ...}, "num_images": n, "object_source": ...,
  "class_names": [...], "postprocessing": "...", "conventions": {...}}``; each block holds ``dice, jaccard, mdice,
  mjaccard, hd95, object_f1, object_dice, object_hausdorff, count``. Pixel metrics are means over the block's
  images; the object metrics are computed the GlaS contest's way over the block (F1 of the summed TP/FP/FN; object
  Dice and Hausdorff pooled over all objects of all images). Non-finite values are written as ``null``.
- ``metrics_per_image.csv``: one row per image (the metrics of that image alone, and its object counts).
- ``overlays/best_<k>_<name>.png`` and ``overlays/worst_<k>_<name>.png``: the image with ground-truth (green) and
  predicted (magenta) contours and a caption; k = 1 is the best (or worst) image.

and prints a summary table (one row per part and one overall) to stdout and to the log.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.utils import convert_to_numpy

from ..errors import BundleInputError
from .object_metrics import GLAS_CONNECTIVITY, ObjectStats, combine_object_stats, label_objects, object_stats
from .overlays import contour_overlay, save_overlay
from .pixel_metrics import pixel_metrics, pooled_scores, to_class_map

__all__ = [
    "BLOCK_KEYS",
    "CONVENTIONS",
    "CSV_COLUMNS",
    "METRIC_KEYS",
    "OBJECT_SOURCES",
    "POOLED_KEYS",
    "SegmentationReport",
]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("dice", "jaccard", "mdice", "mjaccard", "hd95", "object_f1", "object_dice", "object_hausdorff")
PIXEL_KEYS = METRIC_KEYS[:5]
# the second convention: intersections and unions pooled over the images of a block (no per-image value)
POOLED_KEYS = ("pooled_dice", "pooled_jaccard", "pooled_mdice", "pooled_mjaccard")
BLOCK_KEYS = METRIC_KEYS + POOLED_KEYS
CSV_COLUMNS = ("name", "part") + METRIC_KEYS + ("tp", "fp", "fn", "gt_objects", "pred_objects")
OBJECT_SOURCES = ("auto", "instance_masks", "connected_components")
METRICS_FILENAME = "metrics.json"
PER_IMAGE_FILENAME = "metrics_per_image.csv"
OVERLAY_DIRNAME = "overlays"
_OVERLAY_FILE = re.compile(r"^(best|worst)_\d+_.*\.png$")

CONVENTIONS = {
    "units": "fractions in [0, 1]; distances in pixels",
    "dice": "gland (foreground) Dice per image, mean over the foreground classes when there are more than two; "
    "a class absent from both prediction and label scores 1, present in only one 0 (MONAI ignore_empty=False)",
    "jaccard": "as dice, with the Jaccard index (IoU)",
    "mdice": "mean Dice over all classes including background, per image (the semi-supervised GlaS literature)",
    "mjaccard": "mean Jaccard over all classes including background, per image",
    "hd95": "95th percentile symmetric boundary Hausdorff distance per foreground class (as MONAI "
    "compute_hausdorff_distance, percentile=95); 0 if the class is absent from prediction and label, the image "
    "diagonal if absent from only one (BraTS convention)",
    "aggregation": "dice, jaccard, mdice, mjaccard, hd95: mean over the images; object_f1, object_dice, "
    "object_hausdorff: the GlaS contest's values over all images of the block (see object_*); pooled_*: pixel "
    "counts summed over all images of the block",
    "pooled_dice": "gland Dice of the block with intersections and sizes pooled over its images (2 sum|P&G| / "
    "(sum|P| + sum|G|)), the convention of the UniMatch-family code; pooled_jaccard likewise with the IoU; "
    "pooled_mdice / pooled_mjaccard: the mean over all classes including background",
    "objects": "ground-truth objects from instance masks when used (object_source), else 8-connected components of "
    "the label's foreground; predicted objects are 8-connected components of the prediction's foreground "
    "(bwlabel(., 8) in the official GlaS code)",
    "object_f1": "GlaS: a segmented object is a true positive when it covers more than 50% of the ground-truth "
    "object it overlaps most; F1 = 2TP / (2TP + FP + FN) with TP, FP, FN summed over the images; 1 without objects",
    "object_dice": "GlaS: area-weighted Dice of every object with its most-overlapping partner (0 without one), "
    "pooled over all objects of all images; 1 without objects on either side",
    "object_hausdorff": "GlaS: area-weighted Hausdorff distance of every object with its most-overlapping partner, "
    "or the nearest object when none overlaps, pooled over all objects of all images; infinite (null in JSON) "
    "when an image has objects on one side only (official Hausdorff.m), 0 without objects",
    "json": "non-finite values are written as null",
}


def _format_csv(value: Any) -> Any:
    return format(value, ".8g") if isinstance(value, float) else value


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


class _Ranking:
    """The ``size`` items with the largest keys seen so far, with their payloads (a bounded min-heap)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[tuple, int, Any]] = []
        self._counter = itertools.count()

    def qualifies(self, key: tuple) -> bool:
        return self.size > 0 and (len(self._heap) < self.size or key > self._heap[0][0])

    def push(self, key: tuple, payload: Any) -> None:
        entry = (key, next(self._counter), payload)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def ranked(self) -> list[Any]:
        """Payloads, largest key first."""
        return [payload for _, _, payload in sorted(self._heap, key=lambda entry: entry[0], reverse=True)]


class SegmentationReport:
    """Per-image and per-part segmentation metrics, CSV, overlays and a summary table for a MONAI evaluator.

    Args:
        output_dir: folder for ``metrics.json``, ``metrics_per_image.csv`` and ``overlays/``.
        class_names: one name per class, background first.
        num_classes: number of classes including background (default: ``len(class_names)``).
        object_source: ground-truth objects from ``"instance_masks"`` (``instance_key`` required on every item),
            ``"connected_components"`` of the label, or ``"auto"`` (instance masks where an item has one).
        overlay_count: how many best and how many worst images (by gland Dice) get an overlay; 0 for none.
        summary: print the summary table (stdout and log).
        pred_key, label_key: output keys of the prediction (``[1, H, W]`` class map or ``[C, H, W]`` one-hot /
            probabilities) and of the label (same forms).
        instance_key: optional ``[1, H, W]`` ground-truth instance ids (0 = background).
        image_key: the network input ``[C, H, W]``, denormalised with ``intensity_mean`` / ``intensity_std`` and
            multiplied by ``intensity_scale`` for the overlays.
        raw_image_key: an un-normalised ``[3, H, W]`` image with values 0..255, used instead when present.
        name_key, part_key: item keys of the image name and its test part (e.g. ``"testA"``); without a name the
            image's file name (from its metadata) or its index is used; images without a part count only overall.
        intensity_mean, intensity_std: per-channel normalisation that was applied to ``image_key`` (default none).
        intensity_scale: factor from the de-normalised image to 0..255 (255 for images scaled to [0, 1]).
        connectivity: 2 for 8-connected objects (GlaS), 1 for 4-connected.
        overlay_thickness: contour width in pixels.
        postprocessing: what was done to the predictions before scoring (written to ``metrics.json`` and printed).
        tta: the test-time augmentation of the predictions (``--tta``: ``none``, ``flips``, ``dihedral``; written to
            ``metrics.json`` and printed).

    Values are read from each item of ``engine.state.output`` first, then from the matching item of
    ``engine.state.batch`` (where MONAI leaves the datalist's extra keys such as ``name`` and ``part``). After a
    run, ``rows`` holds the per-image rows and ``metrics`` the content of ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        num_classes: int | None = None,
        object_source: str = "auto",
        overlay_count: int = 3,
        summary: bool = True,
        pred_key: str = "pred",
        label_key: str = "label",
        instance_key: str = "instance_label",
        image_key: str = "image",
        raw_image_key: str = "image_raw",
        name_key: str = "name",
        part_key: str = "part",
        intensity_mean: Sequence[float] | None = None,
        intensity_std: Sequence[float] | None = None,
        intensity_scale: float = 255.0,
        connectivity: int = GLAS_CONNECTIVITY,
        overlay_thickness: int = 2,
        postprocessing: str = "none",
        tta: str = "none",
    ) -> None:
        self.class_names = [str(name) for name in class_names]
        self.postprocessing = str(postprocessing)
        self.tta = str(tta)
        self.num_classes = len(self.class_names) if num_classes is None else int(num_classes)
        if len(self.class_names) != self.num_classes:
            raise BundleInputError(
                f"class_names has {len(self.class_names)} entries but num_classes is {self.num_classes}"
            )
        if self.num_classes < 2:
            raise BundleInputError(
                f"num_classes must be at least 2 (background and a foreground class), got {self.num_classes}"
            )
        if object_source not in OBJECT_SOURCES:
            raise BundleInputError(f"object_source must be one of {', '.join(OBJECT_SOURCES)}, got {object_source!r}")
        if int(overlay_count) < 0:
            raise BundleInputError(f"overlay_count must be 0 or more, got {overlay_count}")
        if connectivity not in (1, 2):
            raise BundleInputError(f"connectivity must be 1 (4-connected) or 2 (8-connected), got {connectivity}")
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.object_source = object_source
        self.overlay_count = int(overlay_count)
        self.summary = summary
        self.pred_key, self.label_key, self.instance_key = pred_key, label_key, instance_key
        self.image_key, self.raw_image_key = image_key, raw_image_key
        self.name_key, self.part_key = name_key, part_key
        self.intensity_mean = None if intensity_mean is None else np.asarray(intensity_mean, dtype=np.float64)
        self.intensity_std = None if intensity_std is None else np.asarray(intensity_std, dtype=np.float64)
        self.intensity_scale = float(intensity_scale)
        self.connectivity = connectivity
        self.overlay_thickness = int(overlay_thickness)
        self.metrics: dict[str, Any] | None = None
        self.reset()

    # ------------------------------------------------------------------ engine hooks
    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self._started)
        if not engine.has_event_handler(self._iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        if not engine.has_event_handler(self._completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, _engine: Engine) -> None:
        self.reset()

    def _iteration_completed(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, Mapping):  # decollate=False: split the batch here
            outputs = decollate_batch(outputs)
        if isinstance(batch, Mapping):
            batch = decollate_batch(batch)
        if not isinstance(batch, list) or len(batch) != len(outputs):
            batch = [{}] * len(outputs)
        for output, item in zip(outputs, batch):
            self.add_item(output, item)

    def _completed(self, _engine: Engine) -> None:
        self.write()

    # ------------------------------------------------------------------ per image
    def reset(self) -> None:
        """Forget all images (called when the evaluator starts)."""
        self.rows: list[dict[str, Any]] = []
        self._object_stats: list[ObjectStats] = []
        self._pixel_counts: list[np.ndarray] = []
        self._used_instances: list[bool] = []
        self._best = _Ranking(self.overlay_count)
        self._worst = _Ranking(self.overlay_count)
        self._warned_no_image = False

    @staticmethod
    def _lookup(key: str, output: Mapping, item: Mapping | None) -> Any:
        if key in output and output[key] is not None:
            return output[key]
        if item is not None and key in item:
            return item[key]
        return None

    def _name(self, output: Mapping, item: Mapping | None) -> str:
        name = self._lookup(self.name_key, output, item)
        if isinstance(name, str) and name:
            return name
        for key in (self.image_key, self.label_key, self.pred_key):
            meta = getattr(self._lookup(key, output, item), "meta", None) or {}
            source = meta.get("filename_or_obj")
            if isinstance(source, str) and source:
                return os.path.splitext(os.path.basename(source))[0]
        return f"image_{len(self.rows):04d}"

    def _class_map(self, value: Any, what: str, name: str) -> np.ndarray:
        if value is None:
            raise BundleInputError(f"image {name!r} has no {what!r} in the evaluator output or batch")
        channels = np.shape(value)[0] if np.ndim(value) == 3 else 1
        if channels not in (1, self.num_classes):
            raise BundleInputError(
                f"{what} of image {name!r} has {channels} channels; expected 1 (class map) or {self.num_classes}"
            )
        return to_class_map(value, f"{what} of image {name!r}")

    def add_item(self, output: Mapping, item: Mapping | None = None) -> dict[str, Any]:
        """Compute every metric of one decollated evaluator item (``output``, with its ``batch`` item) and keep its
        row; returns the row."""
        name = self._name(output, item)
        part = self._lookup(self.part_key, output, item)
        part = part if isinstance(part, str) else ""
        pred = self._class_map(self._lookup(self.pred_key, output, item), self.pred_key, name)
        label = self._class_map(self._lookup(self.label_key, output, item), self.label_key, name)
        if pred.shape != label.shape:
            raise BundleInputError(f"prediction of image {name!r} has size {pred.shape} but its label {label.shape}")
        pixels = pixel_metrics(pred, label, self.num_classes)

        instances = (
            None if self.object_source == "connected_components" else self._lookup(self.instance_key, output, item)
        )
        if instances is None and self.object_source == "instance_masks":
            raise BundleInputError(f"object_source is 'instance_masks' but image {name!r} has no {self.instance_key!r}")
        if instances is not None:
            gt_objects = convert_to_numpy(instances)
            gt_objects = gt_objects[0] if gt_objects.ndim == 3 and gt_objects.shape[0] == 1 else gt_objects
            if gt_objects.shape != label.shape:
                raise BundleInputError(
                    f"{self.instance_key} of image {name!r} has size {gt_objects.shape} but its label {label.shape}"
                )
        else:
            gt_objects = label_objects(label, self.connectivity)
        pred_objects = label_objects(pred, self.connectivity)
        objects = object_stats(pred_objects, gt_objects)

        row = {
            "name": name,
            "part": part,
            **{key: getattr(pixels, key) for key in PIXEL_KEYS},
            "object_f1": objects.f1,
            "object_dice": objects.dice,
            "object_hausdorff": objects.hausdorff,
            "tp": objects.tp,
            "fp": objects.fp,
            "fn": objects.fn,
            "gt_objects": objects.gt_objects,
            "pred_objects": objects.pred_objects,
        }
        index = len(self.rows)
        self.rows.append(row)
        self._pixel_counts.append(np.asarray(pixels.per_class_counts, dtype=np.int64))
        self._object_stats.append(objects)
        self._used_instances.append(instances is not None)
        self._rank_for_overlays(index, row, output, item, gt_objects, pred_objects)
        return row

    # ------------------------------------------------------------------ overlays
    def _rgb(self, output: Mapping, item: Mapping | None, shape: tuple[int, int]) -> np.ndarray | None:
        raw = self._lookup(self.raw_image_key, output, item)
        if raw is not None:
            image = convert_to_numpy(raw).astype(np.float64)
        else:
            value = self._lookup(self.image_key, output, item)
            if value is None:
                return None
            image = convert_to_numpy(value).astype(np.float64)
            if image.ndim == 3:
                channels = image.shape[0]
                if self.intensity_std is not None:
                    image = image * self.intensity_std.reshape(-1, 1, 1)[:channels]
                if self.intensity_mean is not None:
                    image = image + self.intensity_mean.reshape(-1, 1, 1)[:channels]
            image = image * self.intensity_scale
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.shape[1:] != shape:
            raise BundleInputError(
                f"image for the overlay has shape {list(image.shape)}; expected [3, H, W] or [1, H, W] with "
                f"H, W = {shape[0]}, {shape[1]} (the label's size)"
            )
        if image.shape[0] == 1:
            image = np.repeat(image, 3, axis=0)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(1, 2, 0)

    def _rank_for_overlays(
        self, index: int, row: dict, output: Mapping, item: Mapping | None, gt_objects, pred_objects
    ) -> None:
        # best: largest Dice; worst: smallest Dice; ties go to the earlier image
        best_key, worst_key = (row["dice"], -index), (-row["dice"], -index)
        wanted = [
            ranking for ranking, key in ((self._best, best_key), (self._worst, worst_key)) if ranking.qualifies(key)
        ]
        if not wanted:
            return
        image = self._rgb(output, item, gt_objects.shape)
        if image is None:
            if not self._warned_no_image:
                logger.warning("no %r or %r in the evaluator output: no overlays", self.raw_image_key, self.image_key)
                self._warned_no_image = True
            return
        caption = [
            f"{row['name']}" + (f" ({row['part']})" if row["part"] else ""),
            f"Dice {row['dice']:.3f}  object F1 {row['object_f1']:.3f}",
            "green: ground truth  magenta: prediction",
        ]
        picture = contour_overlay(image, gt_objects, pred_objects, caption, thickness=self.overlay_thickness)
        payload = (row["name"], picture)
        if self._best in wanted:
            self._best.push(best_key, payload)
        if self._worst in wanted:
            self._worst.push(worst_key, payload)

    def _write_overlays(self) -> list[str]:
        folder = os.path.join(self.output_dir, OVERLAY_DIRNAME)
        if os.path.isdir(folder):  # overlays of an earlier run would be mistaken for this one's
            for entry in os.listdir(folder):
                if _OVERLAY_FILE.match(entry):
                    os.remove(os.path.join(folder, entry))
        paths = []
        for prefix, ranking in (("best", self._best), ("worst", self._worst)):
            for rank, (name, picture) in enumerate(ranking.ranked(), start=1):
                path = os.path.join(folder, f"{prefix}_{rank}_{_safe_name(name)}.png")
                paths.append(save_overlay(picture, path))
        return paths

    # ------------------------------------------------------------------ summary
    def _block(self, indices: Sequence[int]) -> dict[str, Any]:
        rows = [self.rows[i] for i in indices]
        pooled = combine_object_stats(self._object_stats[i] for i in indices)
        block: dict[str, Any] = {key: _mean([row[key] for row in rows]) for key in PIXEL_KEYS}
        counts = [self._pixel_counts[i] for i in indices]
        block.update(pooled_scores(np.sum(counts, axis=0)) if counts else dict.fromkeys(POOLED_KEYS, math.nan))
        block.update(
            object_f1=pooled.f1 if rows else math.nan,
            object_dice=pooled.dice if rows else math.nan,
            object_hausdorff=pooled.hausdorff if rows else math.nan,
            count=len(rows),
        )
        return block

    def _object_source_used(self) -> str:
        if self._used_instances and all(self._used_instances):
            return "instance_masks"
        if not any(self._used_instances):
            return "connected_components"
        return "mixed"

    def compute(self) -> dict[str, Any]:
        """The content of ``metrics.json`` for the images added so far (non-finite values as floats)."""
        parts = sorted({row["part"] for row in self.rows if row["part"]})
        return {
            "overall": self._block(range(len(self.rows))),
            "parts": {
                part: self._block([i for i, row in enumerate(self.rows) if row["part"] == part]) for part in parts
            },
            "num_images": len(self.rows),
            "object_source": self._object_source_used(),
            "class_names": list(self.class_names),
            "postprocessing": self.postprocessing,
            "tta": self.tta,
            "conventions": dict(CONVENTIONS),
        }

    def table(self, metrics: Mapping[str, Any] | None = None) -> str:
        """The summary table: one row per part and one overall, the columns of ``metrics.json``."""
        metrics = self.compute() if metrics is None else metrics
        columns = ("count",) + BLOCK_KEYS
        lines = [("part",) + columns]
        named = list(metrics["parts"].items()) + [("overall", metrics["overall"])]
        for part, block in named:
            cells = [part, str(block["count"])]
            for key in BLOCK_KEYS:
                value = block[key]
                digits = 2 if key in ("hd95", "object_hausdorff") else 4
                cells.append("n/a" if value is None else f"{value:.{digits}f}")
            lines.append(tuple(cells))
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
            for line in lines
        )

    def write(self) -> dict[str, Any]:
        """Write ``metrics.json``, ``metrics_per_image.csv`` and the overlays, print the table; returns the metrics."""
        os.makedirs(self.output_dir, exist_ok=True)
        metrics = self.compute()
        serialisable = json.loads(json.dumps(metrics), parse_constant=lambda constant: None)  # NaN / Infinity -> null
        with open(os.path.join(self.output_dir, METRICS_FILENAME), "w", encoding="utf-8") as handle:
            json.dump(serialisable, handle, indent=4, allow_nan=False)
            handle.write("\n")
        with open(os.path.join(self.output_dir, PER_IMAGE_FILENAME), "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({key: _format_csv(row[key]) for key in CSV_COLUMNS})
        overlays = self._write_overlays() if self.overlay_count else []
        self.metrics = serialisable
        if self.summary:
            table = self.table(metrics) + f"\npost-processing of the predictions: {self.postprocessing}"
            table += f"\ntest-time augmentation: {self.tta}"
            print(table, flush=True)
            logger.info("segmentation report (%d images):\n%s", len(self.rows), table)
        logger.info(
            "wrote %s, %s and %d overlays to %s", METRICS_FILENAME, PER_IMAGE_FILENAME, len(overlays), self.output_dir
        )
        return serialisable
