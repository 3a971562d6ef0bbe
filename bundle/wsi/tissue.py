"""Tissue detection on a low-resolution level, so that inference skips the glass.

H&E tissue is coloured and glass is white or grey: the mask thresholds HSV saturation (Otsu, never below
``min_threshold`` so a blank slide's off-white noise is not split into "tissue"), removes specks, fills holes (gland
lumens and fat are white but are tissue) and is kept at the low resolution; :meth:`TissueMask.tiles` maps a level-0
tile grid onto it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .slide import Slide

__all__ = ["TileSelection", "TissueMask", "detect_tissue"]


class TileSelection(NamedTuple):
    """Level-0 boxes ``(top, left, height, width)`` of the tiles with tissue, and how many tiles were skipped."""

    boxes: list[tuple[int, int, int, int]]
    skipped: int

    @property
    def total(self) -> int:
        return len(self.boxes) + self.skipped


class TissueMask:
    """A boolean tissue mask of a slide at a low resolution.

    ``mask[i, j]`` covers level-0 pixels ``[i * downsample[0], (i + 1) * downsample[0])`` in y (same in x);
    ``level0_size`` is the slide's level-0 ``(height, width)``.
    """

    def __init__(
        self,
        mask: np.ndarray,
        downsample: tuple[float, float],
        level0_size: tuple[int, int],
        level: int,
        threshold: float,
        source: str = "",
    ):
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = (float(downsample[0]), float(downsample[1]))
        self.level0_size = (int(level0_size[0]), int(level0_size[1]))
        self.level = level
        self.threshold = float(threshold)
        self.source = source

    @property
    def fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def notice(self) -> str | None:
        """A line to print when no tissue was found (a blank or very faint slide); ``None`` otherwise."""
        if self.mask.any():
            return None
        name = f" on {self.source}" if self.source else ""
        return (
            f"no tissue found{name} (saturation threshold {self.threshold:.3f} on level {self.level}): "
            "the slide looks blank, so no tile is processed"
        )

    def has_tissue(self, top: int, left: int, height: int, width: int, margin: int = 0) -> bool:
        """Whether the level-0 box, grown by ``margin`` level-0 pixels on each side, touches tissue."""
        dy, dx = self.downsample
        r0 = max(int(math.floor((top - margin) / dy)), 0)
        c0 = max(int(math.floor((left - margin) / dx)), 0)
        r1 = min(int(math.ceil((top + height + margin) / dy)), self.mask.shape[0])
        c1 = min(int(math.ceil((left + width + margin) / dx)), self.mask.shape[1])
        return r1 > r0 and c1 > c0 and bool(self.mask[r0:r1, c0:c1].any())

    def tiles(
        self, tile_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None, margin: int = 0
    ) -> TileSelection:
        """The level-0 tiles of a grid from (0, 0) that touch tissue (within ``margin`` level-0 pixels).

        ``tile_size`` and ``stride`` (default: the tile size, no overlap) are level-0 pixels, a number or
        ``(height, width)``. The last row/column of tiles may reach past the slide (readers pad it white).
        """
        th, tw = _pair(tile_size, "tile_size")
        sy, sx = _pair(tile_size if stride is None else stride, "stride")
        height, width = self.level0_size
        boxes, skipped = [], 0
        for top in range(0, height, sy):
            for left in range(0, width, sx):
                if self.has_tissue(top, left, th, tw, margin):
                    boxes.append((top, left, th, tw))
                else:
                    skipped += 1
        return TileSelection(boxes, skipped)


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive integer or a (height, width) pair, got {value!r}")
    return int(pair[0]), int(pair[1])


def mask_level(slide: Slide, min_side: int = 1024) -> int:
    """The coarsest level whose longest side is at least ``min_side`` pixels (level 0 for a smaller slide)."""
    large = [lv.index for lv in slide.levels if max(lv.height, lv.width) >= min_side]
    return max(large) if large else 0


def read_low_resolution(slide: Slide, level: int, max_side: int = 4096) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole ``level`` as RGB, shrunk by an integer factor (block mean) to at most ``max_side`` pixels.

    A single-level slide has no small level; it is read in strips so that memory stays at one strip. Returns the
    image and its downsample from level 0 ``(y, x)``.
    """
    from skimage.transform import downscale_local_mean

    lv = slide.level(level)
    factor = max(1, math.ceil(max(lv.height, lv.width) / max_side))
    if factor == 1:
        image = slide.read(level, 0, 0, lv.height, lv.width)
    else:
        rows, strip = [], factor * max(1, 1024 // factor)
        for top in range(0, lv.height, strip):
            block = slide.read(level, top, 0, min(strip, lv.height - top), lv.width).astype(np.float32)
            rows.append(downscale_local_mean(block, (factor, factor, 1), cval=255))
        image = np.clip(np.concatenate(rows) + 0.5, 0, 255).astype(np.uint8)
    return image, (factor * lv.downsample[0], factor * lv.downsample[1])


def detect_tissue(
    slide: Slide,
    min_side: int = 1024,
    min_threshold: float = 0.07,
    min_object_um2: float = 5_000.0,
    max_hole_um2: float = 250_000.0,
) -> TissueMask:
    """The tissue mask of ``slide`` on a low-resolution level.

    Args:
        slide: an open :class:`~bundle.wsi.slide.Slide`.
        min_side: the mask is made on the coarsest level whose longest side has at least this many pixels.
        min_threshold: the saturation threshold never goes below this; off-white glass and scanner noise stay
            under ~0.06, pale H&E tissue is above ~0.1.
        min_object_um2: tissue pieces smaller than this (µm², 5000 = a 70 µm square) are dust or noise.
        max_hole_um2: holes up to this area (µm², 250000 = a 0.5 mm square) are filled (lumens, fat, tears).
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    level = mask_level(slide, min_side)
    image, downsample = read_low_resolution(slide, level)
    saturation = rgb2hsv(image)[..., 1]
    otsu = threshold_otsu(saturation) if np.ptp(saturation) > 1e-6 else 0.0
    threshold = max(float(otsu), min_threshold)
    mask = saturation > threshold
    pixel_um2 = slide.mpp[0] * downsample[0] * slide.mpp[1] * downsample[1]
    mask = remove_small_objects(mask, max_size=max(int(min_object_um2 / pixel_um2), 0))
    mask = remove_small_holes(mask, max_size=max(int(max_hole_um2 / pixel_um2), 0))
    size0 = (slide.levels[0].height, slide.levels[0].width)
    return TissueMask(mask, downsample, size0, level, threshold, source=str(slide.path))
