"""Reading rectangular windows of an image as 8-bit RGB without decoding the whole image when it is a TIFF.

MONAI's ``WSIReader`` with the tifffile backend decodes the entire level for every patch it returns, and tifffile's
own windowed access (``aszarr``) needs zarr 3 (Python >= 3.11). :class:`TiffRegionReader` instead decodes only the
tiles or strips that overlap the window, with tifffile's per-segment decoder, so the memory of a window read is the
window (plus at most one row of tiles/strips), whatever the image size. The colour conversion is the one of the
bundle's ``TiffReader`` (palette, min-is-white, 16-bit/float scaling, alpha on white), so a window equals the same
crop of the image as training and whole-image inference read it.

Images that cannot be read window by window (not TIFF, or a TIFF whose image spans several pages) are decoded once
as 8-bit RGB (``H x W x 3`` bytes, still far less than a float tensor) by :class:`ArrayRegionReader`.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import tifffile

from ..data.readers import ImageFileReader, TiffReader
from ..errors import BundleInputError
from .inputs import is_tiff

__all__ = ["ArrayRegionReader", "RegionReader", "TiffRegionReader", "open_region_reader"]

_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}


def _one_line(err: BaseException) -> str:
    return f"{' '.join(str(err).split()) or 'no details'} ({type(err).__name__})"


class RegionReader(Protocol):
    """Windows of one image: ``read(top, left, height, width)`` gives (height, width, 3) uint8 RGB."""

    path: str
    height: int
    width: int

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray: ...

    def close(self) -> None: ...


def _check_window(reader: RegionReader, top: int, left: int, height: int, width: int) -> None:
    if top < 0 or left < 0 or height < 1 or width < 1 or top + height > reader.height or left + width > reader.width:
        raise ValueError(
            f"window ({top}, {left}, {height}, {width}) is outside {reader.path} ({reader.height}x{reader.width})"
        )


class ArrayRegionReader:
    """Windows of an image decoded once, whole, as (H, W, 3) uint8 by the bundle's image reader."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.array, _ = ImageFileReader(rgb=True).load_file(path)
        self.height, self.width = self.array.shape[:2]

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        _check_window(self, top, left, height, width)
        return self.array[top : top + height, left : left + width]

    def close(self) -> None:
        self.array = np.zeros((0, 0, 3), np.uint8)


class NotWindowable(Exception):
    """The TIFF's image is not stored as one 2D page of tiles or strips."""


class TiffRegionReader:
    """Windows of the first image of a TIFF (series 0, full resolution) read tile by tile (or strip by strip).

    Raises :class:`NotWindowable` for images spread over several pages or with a depth axis, and
    :class:`~bundle.errors.BundleInputError` for files tifffile cannot open or decode.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except FileNotFoundError:
            raise BundleInputError(f"image file {path} does not exist") from None
        except Exception as err:
            raise BundleInputError(f"cannot read TIFF file {path}: {_one_line(err)}") from err
        try:
            self._open_page()
        except BaseException:
            self._tif.close()
            raise

    def _open_page(self) -> None:
        level = self._tif.series[0].levels[0]
        if len(level.pages) != 1 or level.pages[0] is None:
            raise NotWindowable(f"{self.path}: the image spans {len(level.pages)} pages")
        self._page = level.pages[0]
        key = self._page.keyframe
        if key.imagedepth > 1:
            raise NotWindowable(f"{self.path}: the image has a depth of {key.imagedepth}")
        photometric = getattr(key.photometric, "name", str(key.photometric))
        if photometric in ("SEPARATED", "CIELAB", "ICCLAB", "ITULAB"):
            raise BundleInputError(f"TIFF {self.path} uses the {photometric} colour space; save it as RGB or grayscale")
        self._photometric = photometric
        self._colormap = key.colormap
        self.height, self.width = int(key.imagelength), int(key.imagewidth)
        self._samples = int(key.samplesperpixel)
        self._separate = key.planarconfig == 2 and self._samples > 1
        if key.is_tiled:
            self._segment_shape = (int(key.tilelength), int(key.tilewidth))
        else:
            self._segment_shape = (min(int(key.rowsperstrip), self.height), self.width)
        self._grid = (math.ceil(self.height / self._segment_shape[0]), math.ceil(self.width / self._segment_shape[1]))
        self._decode_args: dict = {"_fullsize": key.is_tiled}
        if key.compression in _JPEG_COMPRESSIONS:
            self._decode_args.update(jpegtables=self._page.jpegtables, jpegheader=key.jpegheader)
        self._dtype = key.dtype

    def _segment(self, index: int):
        count = int(self._page.databytecounts[index])
        if count == 0:
            return None, None
        handle = self._tif.filehandle
        with handle.lock:
            handle.seek(int(self._page.dataoffsets[index]))
            data = handle.read(count)
        segment, position, _ = self._page.keyframe.decode(data, index, **self._decode_args)
        return segment, position

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The window as (height, width, 3) uint8 RGB, decoding only the overlapping tiles/strips."""
        _check_window(self, top, left, height, width)
        raw = np.zeros((height, width, self._samples), self._dtype)
        seg_h, seg_w = self._segment_shape
        rows, cols = self._grid
        planes = range(self._samples) if self._separate else range(1)
        try:
            for plane in planes:
                for row in range(top // seg_h, (top + height - 1) // seg_h + 1):
                    for col in range(left // seg_w, (left + width - 1) // seg_w + 1):
                        segment, position = self._segment(plane * rows * cols + row * cols + col)
                        if segment is None:
                            continue
                        self._paste(raw, segment, position, top, left, plane)
        except (BundleInputError, ValueError):
            raise
        except Exception as err:  # decoding: missing codec (imagecodecs), corrupt data, ...
            raise BundleInputError(f"cannot read TIFF file {self.path}: {_one_line(err)}") from err
        array = raw[..., 0] if self._samples == 1 else raw
        return TiffReader.as_rgb(array, self._photometric, self._colormap)

    def _paste(self, raw: np.ndarray, segment: np.ndarray, position, top: int, left: int, plane: int) -> None:
        """Copy the part of a decoded segment (1, h, w, samples) at ``position`` that lies inside the window."""
        segment = segment.reshape(segment.shape[-3:])
        y0, x0 = int(position[2]), int(position[3])
        y_start, y_stop = max(y0, top), min(y0 + segment.shape[0], top + raw.shape[0], self.height)
        x_start, x_stop = max(x0, left), min(x0 + segment.shape[1], left + raw.shape[1], self.width)
        if y_start >= y_stop or x_start >= x_stop:
            return
        piece = segment[y_start - y0 : y_stop - y0, x_start - x0 : x_stop - x0]
        target = raw[y_start - top : y_stop - top, x_start - left : x_stop - left]
        if self._separate:
            target[..., plane] = piece[..., 0]
        else:
            target[...] = piece

    def close(self) -> None:
        self._tif.close()


def open_region_reader(path: str | os.PathLike) -> RegionReader:
    """A :class:`TiffRegionReader` for TIFFs stored as one page, an :class:`ArrayRegionReader` otherwise."""
    path = os.fspath(path)
    if is_tiff(path):
        try:
            return TiffRegionReader(path)
        except NotWindowable:
            pass
    return ArrayRegionReader(path)
