"""Pyramidal tiled TIFF label masks and probability maps that QuPath, ASAP, OpenSlide and tifffile open at every level.

File layout (checked against OpenSlide 4 and tifffile): every level is a **top-level IFD**, level 0 first, each tiled,
the reduced levels marked ``NewSubfileType = 1`` (reduced-resolution image). OpenSlide's generic-tiff driver only
takes top-level IFDs marked reduced as levels: with SubIFDs (tifffile's ``subifds=``, the OME convention) or without
the subfile type it sees level 0 only, while tifffile reads this layout as one series with ``levels``.
XResolution/YResolution are in pixels per centimetre (``10000 / mpp``) so OpenSlide reports ``openslide.mpp-x/y``.

Level-0 tiles arrive in any order (inference over tissue tiles), so they cannot be streamed to the TIFF directly:
each tile is compressed once and appended to a hidden scratch file next to the output, indexed in memory; tiles
never written are zero (background). :meth:`PyramidWriter.close` then passes the stored level-0 tiles through to
``tifffile`` unchanged (already encoded) and builds each reduced level tile by tile from the 2 x 2 tiles of the level
above, so memory stays a few tiles whatever the slide size, and the scratch file holds compressed tiles only.
As in :mod:`bundle.inference.writers`, the TIFF is written under a hidden temporary name and renamed into place when
complete; a failure removes the temporary files and never touches ``path``.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import tifffile
from skimage.measure import block_reduce

from ..errors import BundleInputError
from ..inference.writers import _remove, _write_error, temporary_name, to_output_dtype

__all__ = ["PyramidWriter", "default_mask_scale", "pyramid_shapes"]

COMPRESSIONS = {"zlib": tifffile.COMPRESSION.ADOBE_DEFLATE, "deflate": tifffile.COMPRESSION.ADOBE_DEFLATE, "none": 1}
RESAMPLINGS = ("nearest", "mean")
ZLIB_LEVEL = 6
BIGTIFF_BYTES = 2**31  # uncompressed size of all levels above which BigTIFF is used (compressed size is unknown)


def default_mask_scale(num_classes: int) -> int:
    """The mask value of class 1, as ``mask_scale`` in configs/inference.json: 255 for a binary mask, else 1."""
    return 255 if num_classes == 2 else 1


def pyramid_shapes(shape: Sequence[int], tile: int, levels: int | None = None) -> list[tuple[int, int]]:
    """(H, W) of every level: halved (rounded up) until the smallest side fits in a tile, or ``levels`` levels."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while (len(shapes) < levels) if levels is not None else min(shapes[-1]) > tile:
        height, width = shapes[-1]
        shapes.append(((height + 1) // 2, (width + 1) // 2))
    return shapes


class PyramidWriter:
    """Write an (H, W) single-channel map as a pyramidal tiled TIFF from level-0 pieces given in any order.

    Args:
        path: the output ``.tif``; written as a hidden temporary file in the same folder and renamed when complete.
        shape: (H, W) of level 0.
        tile: tile side of every level (a multiple of 16, as TIFF requires).
        dtype: file dtype (unsigned integer; viewers show ``uint8`` best).
        mpp: (x, y) micrometres per level-0 pixel, or None for no physical size.
        levels: number of levels (None: halve until the smallest side is at most ``tile``).
        compression: ``"zlib"``/``"deflate"`` (both Adobe deflate, code 8) or ``"none"``/None.
        photometric: TIFF photometric interpretation (``"minisblack"``: 0 is black).
        resampling: ``"nearest"`` for labels (values stay class values), ``"mean"`` for probabilities.
        scale: multiply the values before the cast to ``dtype`` (255: a 0/1 mask or [0, 1] probabilities as 0..255).
        bigtiff: None chooses BigTIFF when the uncompressed levels exceed 2 GiB.

    :meth:`for_mask` and :meth:`for_probabilities` set the options for the bundle's two kinds of map. Not
    thread-safe: call :meth:`write` from one thread. Use as a context manager, or call :meth:`abort` on error paths.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        tile: int = 256,
        dtype: np.dtype | str = "uint8",
        mpp: Sequence[float] | None = None,
        levels: int | None = None,
        compression: str | None = "zlib",
        photometric: str = "minisblack",
        resampling: str = "nearest",
        scale: float | None = None,
        bigtiff: bool | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._check_options(shape, tile, dtype, mpp, levels, compression, resampling)
        self.shape = (int(shape[0]), int(shape[1]))
        self.tile = int(tile)
        self.dtype = np.dtype(dtype)
        self.mpp = None if mpp is None else (float(mpp[0]), float(mpp[1]))
        self.compression = COMPRESSIONS[str(compression or "none").lower()]
        self.photometric = photometric
        self.resampling = resampling
        self.scale = scale
        self.level_shapes = pyramid_shapes(self.shape, self.tile, levels)
        raw_bytes = sum(h * w for h, w in self.level_shapes) * self.dtype.itemsize
        self.bigtiff = raw_bytes > BIGTIFF_BYTES if bigtiff is None else bool(bigtiff)
        self.temp_path = temporary_name(self.path)
        self.scratch_path = temporary_name(self.path + ".tiles")
        # per level: byte offset and length of each encoded tile in the scratch file (-1: never written, all zero)
        self._offsets = [np.full(self._grid(k), -1, np.int64) for k in range(len(self.level_shapes))]
        self._lengths = [np.zeros(self._grid(k), np.int64) for k in range(len(self.level_shapes))]
        self._end = 0
        self._closed = False
        self._zero_tile = np.zeros((self.tile, self.tile), self.dtype)
        try:
            self._scratch = open(self.scratch_path, "w+b", buffering=0)
        except OSError as err:
            raise _write_error(self.path, err) from err

    def _check_options(self, shape, tile, dtype, mpp, levels, compression, resampling) -> None:
        if len(shape) != 2 or min(int(size) for size in shape) < 1:
            raise BundleInputError(f"cannot write {self.path}: shape must be (height, width) >= 1, got {shape}")
        if int(tile) < 16 or int(tile) % 16:
            raise BundleInputError(f"cannot write {self.path}: the tile size must be a multiple of 16, got {tile}")
        if not np.issubdtype(np.dtype(dtype), np.unsignedinteger):
            raise BundleInputError(f"cannot write {self.path}: dtype must be an unsigned integer type, got {dtype}")
        if mpp is not None and (len(mpp) != 2 or not all(math.isfinite(v) and v > 0 for v in map(float, mpp))):
            raise BundleInputError(f"cannot write {self.path}: mpp must be (x, y) > 0 micrometres, got {mpp}")
        if levels is not None and int(levels) < 1:
            raise BundleInputError(f"cannot write {self.path}: levels must be >= 1 or null, got {levels}")
        if str(compression or "none").lower() not in COMPRESSIONS:
            raise BundleInputError(
                f"cannot write {self.path}: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
            )
        if resampling not in RESAMPLINGS:
            raise BundleInputError(
                f"cannot write {self.path}: resampling must be one of {', '.join(RESAMPLINGS)}, got {resampling!r}"
            )

    @classmethod
    def for_mask(
        cls,
        path: str | os.PathLike,
        shape: Sequence[int],
        num_classes: int = 2,
        mask_scale: float | None = None,
        **kwargs,
    ) -> PyramidWriter:
        """A uint8 label mask: class k is written as ``k * mask_scale`` (default 0/255 for a binary mask, else ids)."""
        scale = default_mask_scale(num_classes) if mask_scale is None else mask_scale
        return cls(path, shape, dtype="uint8", resampling="nearest", scale=scale, **kwargs)

    @classmethod
    def for_probabilities(cls, path: str | os.PathLike, shape: Sequence[int], **kwargs) -> PyramidWriter:
        """An 8-bit probability map: [0, 1] is written as 0..255 and the reduced levels are block means."""
        return cls(path, shape, dtype="uint8", resampling="mean", scale=255, **kwargs)

    @property
    def level_downsamples(self) -> list[float]:
        """Downsample of each level, as OpenSlide reports it (mean of the width and height ratios)."""
        height, width = self.shape
        return [(width / w + height / h) / 2 for h, w in self.level_shapes]

    def _grid(self, level: int) -> tuple[int, int]:
        height, width = self.level_shapes[level]
        return -(-height // self.tile), -(-width // self.tile)

    # scratch file: encoded tiles appended, found through the per-level index

    def _encode(self, tile: np.ndarray) -> bytes:
        data = np.ascontiguousarray(tile, self.dtype).tobytes()
        return zlib.compress(data, ZLIB_LEVEL) if self.compression != 1 else data

    def _store(self, level: int, row: int, col: int, data: bytes) -> None:
        os.pwrite(self._scratch.fileno(), data, self._end)
        self._offsets[level][row, col] = self._end
        self._lengths[level][row, col] = len(data)
        self._end += len(data)

    def _encoded(self, level: int, row: int, col: int) -> bytes | None:
        offset = int(self._offsets[level][row, col])
        if offset < 0:
            return None
        return os.pread(self._scratch.fileno(), int(self._lengths[level][row, col]), offset)

    def _tile(self, level: int, row: int, col: int) -> np.ndarray:
        """A decoded (tile, tile) tile of ``level`` (zeros where nothing was written or outside the grid)."""
        rows, cols = self._grid(level)
        data = self._encoded(level, row, col) if row < rows and col < cols else None
        if data is None:
            return self._zero_tile.copy()
        raw = zlib.decompress(data) if self.compression != 1 else data
        return np.frombuffer(raw, self.dtype).reshape(self.tile, self.tile).copy()

    def _convert(self, values: np.ndarray) -> np.ndarray:
        """``values * scale`` rounded and clipped to ``dtype``, one tile at a time so a large piece is never copied.

        Integer input is scaled as float: uint8 class 2 times 255 would wrap to 254 instead of clipping to 255.
        """
        if self.scale in (None, 1):
            return values if values.dtype == self.dtype else to_output_dtype(values, self.dtype)
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float32)
        return to_output_dtype(values, self.dtype, self.scale)

    def write(self, values: np.ndarray, top: int, left: int) -> None:
        """Put an (h, w) piece of level 0 at (``top``, ``left``); any size, any order, later pieces overwrite.

        Values are multiplied by ``scale`` and rounded/clipped to ``dtype``. Pieces aligned to the tile grid are
        stored directly; others update the tiles they overlap.
        """
        if self._closed:
            raise RuntimeError(f"{self.path} is already closed")
        values = np.asarray(values)
        height, width = self.shape
        if values.ndim != 2 or top < 0 or left < 0 or top + values.shape[0] > height or left + values.shape[1] > width:
            raise ValueError(
                f"piece of shape {values.shape} at ({top}, {left}) does not fit {self.path} of shape {self.shape}"
            )
        size = self.tile
        bottom, right = top + values.shape[0], left + values.shape[1]
        for row in range(top // size, -(-bottom // size)):
            for col in range(left // size, -(-right // size)):
                y0, x0 = row * size, col * size
                y1, x1 = min(y0 + size, height), min(x0 + size, width)  # the tile's part inside the image
                covered = top <= y0 and left <= x0 and bottom >= y1 and right >= x1
                tile = self._zero_tile.copy() if covered else self._tile(0, row, col)
                ys, xs = max(top, y0), max(left, x0)
                ye, xe = min(bottom, y1), min(right, x1)
                tile[ys - y0 : ye - y0, xs - x0 : xe - x0] = self._convert(
                    values[ys - top : ye - top, xs - left : xe - left]
                )
                try:
                    self._store(0, row, col, self._encode(tile))
                except OSError as err:
                    self.abort()
                    raise _write_error(self.path, err) from err

    def _reduce(self, block: np.ndarray) -> np.ndarray:
        """Halve a block (rounded up): every other pixel, or the mean of each 2 x 2 (edge pixels repeated)."""
        if self.resampling == "nearest":
            return block[::2, ::2]
        padded = np.pad(block, ((0, block.shape[0] % 2), (0, block.shape[1] % 2)), mode="edge")
        return to_output_dtype(block_reduce(padded, (2, 2), np.mean), self.dtype)

    def _level_tiles(self, level: int) -> Iterator[bytes]:
        """Encoded tiles of ``level`` in row-major order; reduced levels are built (and stored) from the level above."""
        rows, cols = self._grid(level)
        if level == 0:
            zero = self._encode(self._zero_tile)
            for row in range(rows):
                for col in range(cols):
                    yield self._encoded(0, row, col) or zero
            return
        above_height, above_width = self.level_shapes[level - 1]
        size = self.tile
        for row in range(rows):
            for col in range(cols):
                block = np.block(
                    [[self._tile(level - 1, 2 * row + i, 2 * col + j) for j in range(2)] for i in range(2)]
                )
                block = block[: above_height - 2 * size * row, : above_width - 2 * size * col]
                reduced = self._reduce(block)
                tile = self._zero_tile.copy()
                tile[: reduced.shape[0], : reduced.shape[1]] = reduced
                data = self._encode(tile)
                self._store(level, row, col, data)
                yield data

    def _resolution(self, level: int) -> dict:
        if self.mpp is None:
            return {}
        (height, width), (level_height, level_width) = self.shape, self.level_shapes[level]
        return {
            "resolution": (1e4 / self.mpp[0] * level_width / width, 1e4 / self.mpp[1] * level_height / height),
            "resolutionunit": "CENTIMETER",
        }

    def close(self) -> None:
        """Write every level to the temporary TIFF, rename it to ``path``, remove the scratch file.

        An ``OSError`` (disk full, no permission) removes the temporary files and raises :class:`BundleInputError`
        naming ``path``; ``path`` itself is only ever replaced by a complete file.
        """
        if self._closed:
            return
        try:
            with tifffile.TiffWriter(self.temp_path, bigtiff=self.bigtiff) as tif:
                for level, shape in enumerate(self.level_shapes):
                    tif.write(
                        self._level_tiles(level),
                        shape=shape,
                        dtype=self.dtype,
                        tile=(self.tile, self.tile),
                        photometric=self.photometric,
                        compression=self.compression,
                        subfiletype=1 if level else 0,  # reduced-resolution: OpenSlide's test for a level
                        metadata=None,
                        **self._resolution(level),
                    )
            os.replace(self.temp_path, self.path)
        except OSError as err:
            self.abort()
            raise _write_error(self.path, err) from err
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._discard_scratch()

    def _discard_scratch(self) -> None:
        if not self._scratch.closed:
            self._scratch.close()
        _remove(self.scratch_path)

    def abort(self) -> None:
        """Drop everything written so far: remove the temporary and scratch files (``path`` is never touched)."""
        self._closed = True
        self._discard_scratch()
        _remove(self.temp_path)

    def __enter__(self) -> PyramidWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
