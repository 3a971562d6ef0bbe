"""The one TIFF decoder of the bundle: series 0, pyramid level 0, as an (H, W) or (H, W, C) array.

The training reader (:class:`bundle.data.readers.TiffReader`) and the dataset checks of ``python -m bundle.prepare``
both decode with :func:`decode_tiff`, so what preparation accepts is what training reads. numpy and tifffile only:
preparation does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tifffile

from ..errors import BundleInputError

__all__ = ["DecodedTiff", "decode_tiff"]

MAX_CHANNELS = 4


@dataclass(frozen=True)
class DecodedTiff:
    """A decoded TIFF image: pixels (H, W[, C]) in the stored dtype, tifffile's photometric name, colour map."""

    array: np.ndarray
    photometric: str
    colormap: np.ndarray | None


def decode_tiff(path: str) -> DecodedTiff:
    """Decode ``path``. tifffile's own errors (missing, truncated or foreign files) propagate for the caller to
    word; a decodable file that is not a 2D image with at most 4 channels is a :class:`BundleInputError`."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        level = series.levels[0]
        array = level.asarray()
        axes = level.axes
        photometric = getattr(series.keyframe, "photometric", None)
        colormap = getattr(series.keyframe, "colormap", None)
    return DecodedTiff(_channels_last(array, axes, path), getattr(photometric, "name", str(photometric)), colormap)


def _channels_last(array: np.ndarray, axes: str, path: str) -> np.ndarray:
    """``array`` as (H, W) or (H, W, C) from tifffile's axes string (e.g. ``YX``, ``YXS``, ``SYX``, ``CYX``); axes of
    length 1 are dropped."""
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise BundleInputError(f"TIFF {path} has axes {axes!r} with shape {array.shape}; expected a 2D image")
    keep = [i for i, axis in enumerate(axes) if axis in "YX" or array.shape[i] > 1]
    squeezed = "".join(axes[i] for i in keep)
    array = array.reshape([array.shape[i] for i in keep])
    extra = [i for i, axis in enumerate(squeezed) if axis not in "YX"]
    if len(extra) > 1 or (extra and array.shape[extra[0]] > MAX_CHANNELS):
        raise BundleInputError(
            f"TIFF {path} has axes {axes!r} with shape {array.shape}; expected a 2D image with at most "
            f"{MAX_CHANNELS} channels"
        )
    order = [squeezed.index("Y"), squeezed.index("X"), *extra]
    return np.ascontiguousarray(np.transpose(array, order))
