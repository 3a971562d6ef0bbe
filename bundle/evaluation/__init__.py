"""Evaluation components: pixel metrics, GlaS object-level metrics, overlays and the segmentation report handler."""

from .object_metrics import (
    GLAS_CONNECTIVITY,
    ObjectStats,
    combine_object_stats,
    f1_from_counts,
    label_objects,
    object_dice,
    object_f1,
    object_hausdorff,
    object_stats,
)
from .overlays import contour_overlay, save_overlay
from .pixel_metrics import PixelMetrics, boundary_hd95, pixel_metrics, to_class_map
from .report import SegmentationReport

__all__ = [
    "GLAS_CONNECTIVITY",
    "ObjectStats",
    "PixelMetrics",
    "SegmentationReport",
    "boundary_hd95",
    "combine_object_stats",
    "contour_overlay",
    "f1_from_counts",
    "label_objects",
    "object_dice",
    "object_f1",
    "object_hausdorff",
    "object_stats",
    "pixel_metrics",
    "save_overlay",
    "to_class_map",
]
