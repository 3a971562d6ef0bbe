"""Overlay pictures for evaluation reports: the RGB image with ground-truth and predicted contours and a caption."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from skimage.segmentation import find_boundaries

__all__ = ["GT_COLOR", "PRED_COLOR", "contour_overlay", "save_overlay"]

GT_COLOR = (0, 255, 0)  # green
PRED_COLOR = (255, 0, 255)  # magenta
_TEXT_COLOR = (255, 255, 255)
_CAPTION_BACKGROUND = (0, 0, 0)


def _contours(labels: np.ndarray, thickness: int) -> np.ndarray:
    """Inner contours of every labelled region (also between touching regions), ``thickness`` pixels wide."""
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    if thickness > 1:
        edges = ndimage.binary_dilation(edges, iterations=thickness - 1) & (labels > 0)
    return edges


def contour_overlay(
    image: np.ndarray,
    gt_labels: np.ndarray,
    pred_labels: np.ndarray,
    caption: str | Sequence[str] | None = None,
    thickness: int = 2,
    gt_color: tuple[int, int, int] = GT_COLOR,
    pred_color: tuple[int, int, int] = PRED_COLOR,
) -> Image.Image:
    """The image ``[H, W, 3]`` (uint8 RGB) with the contours of the ground-truth regions (green) and of the predicted
    regions (magenta) drawn over it, and an optional caption (one string per line) in the top-left corner when it
    fits in the top third of the picture.

    ``gt_labels`` / ``pred_labels`` are ``[H, W]`` label maps: class maps or object ids (touching objects with
    different ids get a contour between them). The result has the image's size."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
    if gt_labels.shape != image.shape[:2] or pred_labels.shape != image.shape[:2]:
        raise ValueError(f"label maps {gt_labels.shape} / {pred_labels.shape} do not match image {image.shape[:2]}")
    canvas = image.copy()
    canvas[_contours(gt_labels, thickness)] = gt_color
    canvas[_contours(pred_labels, thickness)] = pred_color
    picture = Image.fromarray(canvas)
    if caption:
        text = caption if isinstance(caption, str) else "\n".join(caption)
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default()
        _, _, right, bottom = draw.multiline_textbbox((4, 4), text, font=font)
        # only where the caption leaves most of the picture visible (not on thumbnails)
        if right + 4 <= picture.width and bottom + 4 <= picture.height // 3:
            draw.rectangle((0, 0, right + 4, bottom + 4), fill=_CAPTION_BACKGROUND)
            draw.multiline_text((4, 4), text, fill=_TEXT_COLOR, font=font)
    return picture


def save_overlay(picture: Image.Image, path: str) -> str:
    """Write ``picture`` as PNG to ``path`` (folders created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path, format="PNG")
    return path
