"""Inference components of ``configs/inference.json``: inputs, weight loading, writers, the tiled path for large images.

- :mod:`.inputs`: ``inference_inputs`` (a folder, an image or a datalist -> ``[{"image": path}]``), ``filter_by_size``
- :mod:`.checkpoint`: ``CheckpointWeightsLoader`` / ``load_network_weights`` (``models/model.pt`` into the network)
- :mod:`.writers`: ``SaveSegmentationd`` (a ``SaveImaged`` writing masks/probabilities with the input's size)
- :mod:`.regions`: windows of an image (a TIFF is decoded tile by tile)
- :mod:`.cleanup`: ``MaskCleanupd`` (objects under ``min_object_area`` removed, holes filled, per class)
- :mod:`.label_output`: ``LabelOutputd`` (the class map as a uint8 (x, y) label: the end of ``postprocessing``, what
  MONAI Label saves)
- :mod:`.scaling`: ``ScaledInferer`` (predicts at the model's ``image_scale``, returns the input's size)
- :mod:`.tta`: ``FlipInferer`` (``tta``: each window predicted in flipped views, their probabilities averaged)
- :mod:`.large_images`: ``LargeImageSegmenter`` (block-wise sliding-window inference, tiled TIFF output)
- :mod:`.skipping`: ``--on_error stop|skip`` (``SkippedImages``, ``readable_items``: unreadable images left out and
  listed in ``skipped.csv``)
"""

from __future__ import annotations

from .checkpoint import CheckpointWeightsLoader, load_network_weights, network_state_dict
from .cleanup import MaskCleanup, MaskCleanupd, describe_cleanup
from .inputs import IMAGE_SUFFIXES, filter_by_size, image_size, inference_inputs, is_tiff
from .label_output import LabelOutputd
from .large_images import LargeImageSegmenter
from .regions import ArrayRegionReader, TiffRegionReader, open_region_reader
from .scaling import ScaledInferer, check_image_scale
from .skipping import SkippedImages, UnreadableImage, check_on_error, readable_items
from .tta import TTA_MODES, FlipAveraging, FlipInferer, check_tta
from .writers import (
    OutputFolderLayout,
    SaveSegmentationd,
    SegmentationWriter,
    TiledTiffWriter,
    check_output_files,
    output_file,
    write_map,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "TTA_MODES",
    "ArrayRegionReader",
    "FlipAveraging",
    "FlipInferer",
    "CheckpointWeightsLoader",
    "LabelOutputd",
    "LargeImageSegmenter",
    "MaskCleanup",
    "MaskCleanupd",
    "OutputFolderLayout",
    "SaveSegmentationd",
    "ScaledInferer",
    "SegmentationWriter",
    "SkippedImages",
    "TiffRegionReader",
    "TiledTiffWriter",
    "UnreadableImage",
    "filter_by_size",
    "check_image_scale",
    "check_on_error",
    "check_tta",
    "check_output_files",
    "describe_cleanup",
    "image_size",
    "inference_inputs",
    "is_tiff",
    "load_network_weights",
    "network_state_dict",
    "open_region_reader",
    "output_file",
    "readable_items",
    "write_map",
]
