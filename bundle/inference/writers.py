"""Writing masks and probability maps with exactly the input's height x width, in natural (row, column) order.

MONAI's ``SaveImaged`` is kept as the entry point (MONAI Label drops every ``SaveImaged`` from a bundle's
postprocessing, and so drops these writers too), but with two parts of its own:

- :class:`SegmentationWriter`, a MONAI ``ImageWriter``: MONAI's ``PILWriter`` swaps rows and columns by default
  (``reverse_indexing=True``: it expects PILReader's (W, H) arrays, while the bundle reads (H, W)), resamples when the
  metadata asks for it and cannot write float or multi-channel TIFF. This writer never resamples: it checks that
  the map has the input's (H, W) and writes PNG through Pillow, TIFF through tifffile (zlib-compressed).
- :class:`OutputFolderLayout`: ``<output_dir>/[<sub-folder>/]<stem>_<postfix><ext>``; without a fixed extension a
  TIFF input gets a ``.tif`` output and every other input a ``.png``.

:class:`TiledTiffWriter` writes a large map band by band as a tiled TIFF, so that neither the map nor the image is
ever held whole in memory (see :mod:`bundle.inference.large_images`).

Every file is written under a hidden temporary name in its own folder (:func:`output_file`) and renamed into place
(``os.replace``, atomic on one file system) only once complete: a failed, interrupted or killed write never leaves a
truncated file under the output's name that looks like a result (an existing file stays as it was until the new one
is complete), and a write error (disk full, no permission) is one line naming the output.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import tifffile
from monai.data import FolderLayout, ImageWriter, create_file_basename
from monai.transforms import SaveImaged
from monai.utils import convert_data_type
from PIL import Image

from ..errors import BundleInputError
from .inputs import is_tiff

__all__ = [
    "MASK_EXTENSIONS",
    "OutputFolderLayout",
    "SaveSegmentationd",
    "SegmentationWriter",
    "TiledTiffWriter",
    "check_output_ext",
    "check_output_files",
    "output_file",
    "to_output_dtype",
    "write_map",
]

MASK_EXTENSIONS = (".png", ".tif", ".tiff")
TIFF_COMPRESSION = "zlib"
logger = logging.getLogger(__name__)


def check_output_ext(output_ext: str | None) -> str | None:
    """Normalise ``output_ext`` (``None``/``""``: chosen per input) or raise :class:`BundleInputError`."""
    if output_ext is None or output_ext == "":
        return None
    ext = output_ext.lower() if output_ext.startswith(".") else f".{output_ext.lower()}"
    if ext not in MASK_EXTENSIONS:
        raise BundleInputError(
            f"output_ext must be one of {', '.join(MASK_EXTENSIONS)} or null (PNG, TIFF for TIFF inputs), "
            f"got {output_ext!r}"
        )
    return ext


def to_output_dtype(values: np.ndarray, dtype: np.dtype | str, scale: float | None = None) -> np.ndarray:
    """``values * scale`` as ``dtype``: integer types are rounded and clipped to their range, floats cast."""
    dtype = np.dtype(dtype)
    if scale is not None and scale != 1:
        values = np.asarray(values, dtype=np.float64) * scale  # uint8 class 2 x 255 would wrap to 254, not clip
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def temporary_name(path: str) -> str:
    """A hidden name next to ``path`` for its file while it is written (``.<stem>.<token>.tmp<ext>``).

    Hidden, so a folder used as both input and output never lists it as an image; unique per process and call.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{ext}")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_error(path: str, err: OSError) -> BundleInputError:
    return BundleInputError(f"cannot write {path}: {err.strerror or err}")


@contextmanager
def output_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name next to ``path`` to write to; it is renamed to ``path`` when the block completes.

    On any failure the temporary file is removed (``path`` is never touched); an ``OSError`` (disk full, no
    permission) becomes a :class:`BundleInputError` naming ``path``.
    """
    path = os.fspath(path)
    temp = temporary_name(path)
    try:
        yield temp
        os.replace(temp, path)
    except BaseException as err:
        _remove(temp)
        if isinstance(err, OSError):
            raise _write_error(path, err) from err
        raise


def write_map(path: str, array: np.ndarray) -> None:
    """Write an (H, W) or (H, W, C) map: ``.png`` through Pillow (8/16-bit single channel), TIFF through tifffile.

    Written to a temporary name and renamed into place when complete (:func:`output_file`).
    """
    if not is_tiff(path) and (array.ndim != 2 or array.dtype not in (np.uint8, np.uint16)):
        raise BundleInputError(
            f"cannot write {path}: PNG holds single-channel 8/16-bit maps, not {array.dtype} with shape "
            f"{array.shape}; use a .tif output"
        )
    with output_file(path) as temp:
        if is_tiff(path):
            planarconfig = "contig" if array.ndim == 3 else None
            tifffile.imwrite(
                temp,
                array,
                photometric="minisblack",
                planarconfig=planarconfig,
                compression=TIFF_COMPRESSION,
                metadata=None,
            )
        else:
            Image.fromarray(array).save(temp, format="PNG")


class SegmentationWriter(ImageWriter):
    """A MONAI ``ImageWriter`` for 2D maps ``[C, H, W]`` in (row, column) order: no resampling, no axis swap.

    Args (given by ``SaveImage`` as ``init_kwargs``):
        output_dtype: dtype of the file (integer maps are rounded and clipped).
        scale: multiply the values before the cast (e.g. 255 for a 0/255 binary mask).
        channels: indices of the channels to write (``None``: all); one channel gives an (H, W) file.
        xy_order: the map is in MONAI's (x, y) axis order (the label :class:`~bundle.inference.LabelOutputd` makes for
            MONAI Label, ``[W, H]`` with an (x, y) ``spatial_shape``): its two spatial axes are swapped back.

    ``set_metadata`` checks that the map's (H, W) equals the input's ``spatial_shape``; ``write`` picks Pillow for
    ``.png`` and tifffile for ``.tif``/``.tiff``.
    """

    def __init__(
        self,
        output_dtype: np.dtype | str | None = np.uint8,
        scale: float | None = None,
        channels: Sequence[int] | None = None,
        xy_order: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(output_dtype=output_dtype, scale=scale, channels=channels, xy_order=xy_order, **kwargs)

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs):
        array = convert_data_type(data_array, np.ndarray)[0]
        array = array[None] if channel_dim is None else np.moveaxis(array, channel_dim, 0)
        if array.ndim != 3:
            raise ValueError(f"{type(self).__name__} writes 2D maps [C, H, W], got shape {tuple(array.shape)}")
        if self.xy_order:
            array = np.swapaxes(array, 1, 2)
        if self.channels is not None:
            array = array[list(self.channels)]
        array = np.moveaxis(array, 0, -1)
        if squeeze_end_dims and array.shape[-1] == 1:
            array = array[..., 0]
        self.data_obj = array

    def set_metadata(self, meta_dict: dict | None = None, **options) -> None:
        shape = meta_dict.get("spatial_shape") if meta_dict else None
        if shape is None:
            return
        expected = tuple(int(size) for size in np.asarray(shape).ravel()[-2:])
        expected = expected[::-1] if self.xy_order else expected
        if expected != tuple(self.data_obj.shape[:2]):
            name = meta_dict.get("filename_or_obj", "the input")
            raise ValueError(f"map of shape {self.data_obj.shape[:2]} does not match {name} of size {expected}")

    def write(self, filename: str, verbose: bool = False, **kwargs) -> None:
        super().write(filename, verbose=verbose)
        array = self.data_obj
        if self.output_dtype is not None:
            array = to_output_dtype(array, self.output_dtype, self.scale)
        write_map(os.fspath(filename), array)


class OutputFolderLayout(FolderLayout):
    """``<output_dir>/[<path relative to data_root_dir>/]<stem>_<postfix><ext>`` for an input image path.

    ``extension`` None chooses per input: ``.tif`` for TIFF inputs, ``.png`` otherwise.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        postfix: str,
        extension: str | None = None,
        data_root_dir: str | os.PathLike = "",
        makedirs: bool = True,
    ) -> None:
        super().__init__(output_dir, postfix, check_output_ext(extension) or "", False, makedirs, data_root_dir)

    def extension_for(self, subject: str) -> str:
        return self.ext or (".tif" if is_tiff(subject) else ".png")

    def filename(self, subject: str | os.PathLike = "subject", idx=None, **kwargs) -> str:
        subject = os.fspath(subject)
        output_dir = os.fspath(self.output_dir)
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise BundleInputError(f"output folder {output_dir} exists but is not a folder")
        try:
            base = create_file_basename(
                self.postfix, subject, output_dir, self.data_root_dir, False, idx, self.makedirs
            )
        except OSError as err:
            raise BundleInputError(f"cannot create the output folder {output_dir}: {err.strerror or err}") from err
        for key, value in kwargs.items():
            base += f"_{key}-{value}"
        return base + self.extension_for(subject)


def check_output_files(
    items: Sequence[dict],
    output_dir: str | os.PathLike,
    output_ext: str | None = None,
    data_root_dir: str | os.PathLike = "",
    save_probabilities: bool = False,
    overwrite: bool = False,
    extra_files: Sequence[str] = (),
) -> list[str]:
    """The files this inference run will write; refuse to start when one exists already, unless ``overwrite``.

    A mask or probability map already in ``output_dir`` (a ground-truth ``<name>_mask.png`` next to its image, a
    previous run's result) is never replaced silently: the run stops before any work with one line naming the first
    such file and how many there are. ``--overwrite True`` replaces them. ``extra_files``: other files of the run
    (names in ``output_dir``, e.g. the list of skipped images), checked the same way.
    """
    layouts = [OutputFolderLayout(output_dir, "mask", output_ext, data_root_dir, makedirs=False)]
    if save_probabilities:
        layouts.append(OutputFolderLayout(output_dir, "prob", ".tif", data_root_dir, makedirs=False))
    paths = [layout.filename(subject=item["image"]) for item in items for layout in layouts]
    paths += [os.path.join(os.fspath(output_dir), name) for name in extra_files]
    existing = [path for path in paths if os.path.lexists(path)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise BundleInputError(
            f"{existing[0]}{more} exists already; this run would replace it: choose another --output_dir or pass "
            "--overwrite True"
        )
    return paths


class SaveSegmentationd(SaveImaged):
    """``SaveImaged`` writing ``keys`` as ``<output_dir>/<stem>_<output_postfix><ext>`` with the input's (H, W).

    Args:
        keys: the maps to write (``[C, H, W]`` MetaTensors carrying the input's metadata).
        output_dir: output folder (created when the first file is written).
        output_postfix: ``mask``, ``prob``, ...
        output_ext: ``.png``, ``.tif``, ``.tiff`` or None (``.tif`` for TIFF inputs, ``.png`` otherwise).
        output_dtype: file dtype (``uint8`` for masks, ``float32``/``float16`` for probabilities).
        scale: multiply the values before the cast (255 writes a binary mask as 0/255).
        channels: channels to write (``None``: all; ``[1]``: the foreground probability of a binary model).
        xy_order: the key holds a :class:`~bundle.inference.LabelOutputd` label (MONAI's (x, y) order); written in
            the image's own (row, column) order all the same.
        data_root_dir: keep the inputs' sub-folders below this folder in ``output_dir``.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        output_dir: str | os.PathLike,
        output_postfix: str = "mask",
        output_ext: str | None = None,
        output_dtype: str | np.dtype = "uint8",
        scale: float | None = None,
        channels: Sequence[int] | None = None,
        xy_order: bool = False,
        data_root_dir: str | os.PathLike = "",
        print_log: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        layout = OutputFolderLayout(output_dir, output_postfix, output_ext, data_root_dir)
        dtype = np.dtype(output_dtype)
        if not np.issubdtype(dtype, np.number):
            raise BundleInputError(f"output dtype must be numeric, got {output_dtype!r}")
        super().__init__(
            keys=keys,
            output_dir=output_dir,
            output_postfix=output_postfix,
            output_ext=layout.ext or ".tif",
            resample=False,
            scale=scale,
            output_dtype=dtype,
            squeeze_end_dims=True,
            separate_folder=False,
            print_log=print_log,
            writer=SegmentationWriter,
            folder_layout=layout,
            allow_missing_keys=allow_missing_keys,
        )
        self.saver.set_options(init_kwargs={"output_dtype": dtype, "channels": channels, "xy_order": xy_order})
        self.layout = layout


class TiledTiffWriter:
    """Write an (H, W[, C]) map as a tiled, zlib-compressed TIFF from horizontal bands, never holding it whole.

    ``tifffile.imwrite`` consumes the tiles from a generator in a background thread; :meth:`write_band` cuts each
    band (a multiple of ``tile`` rows, except the last) into tiles and queues them in row-major order. At most
    ``max_queued`` tiles wait in memory. The file is written under a temporary name (``temp_path``) and renamed to
    ``path`` by :meth:`close` once complete. Use as a context manager: a failure removes the partial file.
    """

    def __init__(
        self,
        path: str,
        height: int,
        width: int,
        dtype: np.dtype | str,
        channels: int = 1,
        tile: int = 256,
        max_queued: int = 64,
    ) -> None:
        self.path = path
        self.temp_path = temporary_name(path)
        self.height, self.width, self.channels, self.tile = height, width, channels, tile
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._error: BaseException | None = None
        self._done = object()
        self._thread = threading.Thread(target=self._write, name=f"tiff-writer {os.path.basename(path)}", daemon=True)
        self._thread.start()

    def _tiles(self):
        while True:
            tile = self._queue.get()
            if tile is self._done:
                return
            yield tile

    def _write(self) -> None:
        shape = (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)
        try:
            tifffile.imwrite(
                self.temp_path,
                data=self._tiles(),
                shape=shape,
                dtype=self.dtype,
                tile=(self.tile, self.tile),
                photometric="minisblack",
                planarconfig="contig" if self.channels > 1 else None,
                compression=TIFF_COMPRESSION,
                metadata=None,
            )
        except Exception as err:  # reported to the caller by _put/close
            self._error = err

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, OSError):
                raise _write_error(self.path, err) from err
            raise RuntimeError(f"writing {self.path} failed: {err}") from err

    def write_band(self, band: np.ndarray) -> None:
        """Queue the next ``band.shape[0]`` rows (full width); bands must be multiples of ``tile`` rows but the last."""
        rows = band.shape[0]
        if band.shape[1] != self.width or self.rows_written + rows > self.height:
            raise ValueError(f"band {band.shape} does not fit {self.path} ({self.height}x{self.width})")
        if rows % self.tile and self.rows_written + rows != self.height:
            raise ValueError(f"bands must be multiples of {self.tile} rows except the last, got {rows}")
        band = band.astype(self.dtype, copy=False)
        tile_shape = (self.tile, self.tile) + band.shape[2:]
        for top in range(0, rows, self.tile):
            for left in range(0, self.width, self.tile):
                piece = band[top : top + self.tile, left : left + self.tile]
                if piece.shape != tile_shape:
                    padded = np.zeros(tile_shape, self.dtype)
                    padded[: piece.shape[0], : piece.shape[1]] = piece
                    piece = padded
                self._put(np.ascontiguousarray(piece))
        self.rows_written += rows

    def close(self) -> None:
        """Finish the file (all rows must have been written), wait for the writer thread, rename it into place."""
        if self.rows_written != self.height:
            self.abort()
            raise RuntimeError(f"{self.path}: only {self.rows_written} of {self.height} rows were written")
        try:
            if self._thread.is_alive():
                self._put(self._done)
            self._thread.join()
            self._raise_if_failed()
            os.replace(self.temp_path, self.path)
        except OSError as err:
            self.abort()
            raise _write_error(self.path, err) from err
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop the writer thread and remove the partial file (``path`` itself is never touched)."""
        while self._thread.is_alive():
            try:
                self._queue.put(self._done, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        _remove(self.temp_path)

    def __enter__(self) -> TiledTiffWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
