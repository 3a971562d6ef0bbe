"""Mask clean-up after the argmax: drop objects below ``min_object_area`` pixels and fill holes, class by class.

Pixel classifiers leave specks of a few pixels and pin-holes inside glands; each speck is a false-positive object
and each hole can split one gland in two for the GlaS object metrics. Every foreground class is cleaned as its own
binary mask with MONAI's ``RemoveSmallObjects`` and ``FillHoles``: removed pixels become background, and a hole is
filled only where it is background (a hole of another class inside a gland keeps its class). Areas are in pixels
of the mask as written, i.e. of the image's original resolution.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import FillHoles, MapTransform, RemoveSmallObjects
from monai.utils import convert_to_dst_type

from ..errors import BundleInputError

__all__ = ["MaskCleanup", "MaskCleanupd", "describe_cleanup"]


def describe_cleanup(min_object_area: int, fill_holes: bool) -> str:
    """One phrase for reports: what the clean-up did (or ``"none"``)."""
    steps = []
    if min_object_area > 0:
        steps.append(f"objects under {min_object_area} px removed")
    if fill_holes:
        steps.append("holes filled")
    return ", ".join(steps) if steps else "none"


class MaskCleanup:
    """Clean a class map ``[1, H, W]`` (or ``[H, W]``) of integer classes, 0 = background; returns the same type.

    Args:
        min_object_area: foreground objects (8-connected) with fewer pixels are set to background; 0 keeps all.
        fill_holes: set background pixels enclosed by one class to that class.
    """

    def __init__(self, min_object_area: int = 0, fill_holes: bool = False) -> None:
        if isinstance(min_object_area, bool) or not isinstance(min_object_area, (int, np.integer)):
            raise BundleInputError(f"min_object_area must be a whole number of pixels >= 0, got {min_object_area!r}")
        if min_object_area < 0:
            raise BundleInputError(f"min_object_area must be a whole number of pixels >= 0, got {min_object_area}")
        if not isinstance(fill_holes, bool):
            raise BundleInputError(f"fill_holes must be true or false, got {fill_holes!r}")
        self.min_object_area = int(min_object_area)
        self.fill_holes = fill_holes
        self._remove = RemoveSmallObjects(min_size=self.min_object_area, connectivity=2) if min_object_area else None
        self._fill = FillHoles(applied_labels=[1], connectivity=1) if fill_holes else None

    @property
    def enabled(self) -> bool:
        return self._remove is not None or self._fill is not None

    def __call__(self, mask):
        if not self.enabled:
            return mask
        classes = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        squeeze = classes.ndim == 2
        labels = (classes[None] if squeeze else classes).astype(np.int64)
        if labels.ndim != 3 or labels.shape[0] != 1:
            raise ValueError(f"MaskCleanup expects a class map [1, H, W] or [H, W], got shape {classes.shape}")
        cleaned = labels.copy()
        classes_present = [value for value in np.unique(labels) if value != 0]
        if self._remove is not None:  # first every class's specks, so that a removed speck can be a hole below
            for value in classes_present:
                binary = labels == value
                with warnings.catch_warnings():  # scikit-image's min_size -> max_size rename, inside MONAI
                    warnings.simplefilter("ignore", FutureWarning)
                    kept = np.asarray(self._remove(binary.astype(np.uint8))).astype(bool)
                cleaned[binary & ~kept] = 0
        if self._fill is not None:
            for value in classes_present:
                binary = cleaned == value
                filled = np.asarray(self._fill(binary.astype(np.uint8))).astype(bool)
                cleaned[filled & ~binary & (cleaned == 0)] = value
        result = cleaned[0] if squeeze else cleaned
        return convert_to_dst_type(result.astype(classes.dtype, copy=False), dst=mask)[0]


class MaskCleanupd(MapTransform):
    """Dictionary version of :class:`MaskCleanup` (for the evaluation and inference post-processing)."""

    def __init__(
        self, keys: KeysCollection, min_object_area: int = 0, fill_holes: bool = False, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cleanup = MaskCleanup(min_object_area, fill_holes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cleanup(d[key])
        return d
