"""Whole-slide images built in the tests: real GlaS tiles on an off-white canvas, written as pyramidal TIFFs.

The layout is what OpenSlide's generic-tiff driver reads (checked with ``openslide.OpenSlide``): tiled top-level IFDs
of halving size, the reduced ones marked ``subfiletype=1``, XResolution/YResolution in pixels per cm. zlib keeps the
pixels exact, so reads can be compared with the arrays written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from skimage.io import imread
from skimage.transform import downscale_local_mean


def off_white(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Glass: RGB 236-247 per channel, independent noise (saturation under 0.05)."""
    rng = np.random.default_rng(seed)
    return (236 + rng.integers(0, 12, (*shape, 3), dtype=np.uint8)).astype(np.uint8)


def glas_canvas(
    glas_dir: Path, names: list[str], tops_lefts: list[tuple[int, int]], shape=(5000, 6000), seed: int = 0
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """GlaS images pasted on glass; returns the canvas and the ``(top, left, height, width)`` of each image."""
    canvas = off_white(shape, seed)
    boxes = []
    for name, (top, left) in zip(names, tops_lefts):
        image = imread(Path(glas_dir) / "images" / f"{name}.png")[..., :3]
        h, w = image.shape[:2]
        canvas[top : top + h, left : left + w] = image
        boxes.append((top, left, h, w))
    return canvas, boxes


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``levels`` arrays, each the previous one halved by 2x2 block means (odd last rows/columns dropped)."""
    out = [image]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        out.append(np.round(downscale_local_mean(prev[:h, :w], (2, 2, 1))).astype(np.uint8))
    return out


def write_tiled_pyramid(path: Path, levels: list[np.ndarray], mpp: float | None, tile: int = 256) -> Path:
    """Write ``levels`` as top-level tiled IFDs; ``mpp`` (µm per level-0 pixel) as resolution in cm, or none."""
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            kwargs = {}
            if mpp is not None:
                ds = levels[0].shape[0] / level.shape[0]
                kwargs = {"resolution": (1e4 / (mpp * ds),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=0 if i == 0 else 1,
                **kwargs,
            )
    return path


def write_ome_subifds(path: Path, levels: list[np.ndarray], mpp: float, tile: int = 256) -> Path:
    """An OME-TIFF with the reduced levels in SubIFDs (OpenSlide sees one level) and PhysicalSizeX/Y in µm."""
    with tifffile.TiffWriter(path, ome=True) as tw:
        common = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
        metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tw.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **common)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **common)
    return path
