"""Image and mask readers for MONAI's ``LoadImage(d)``: PNG/JPEG/BMP through MONAI's ``PILReader``, TIFF through
tifffile, always in (row, column) order, images as 8-bit RGB and masks with their stored values.

Why one reader per role instead of ``[PILReader(...), TiffReader(...)]``: when ``LoadImage`` is given readers it
calls each one's ``read()`` inside ``try/except Exception``, silently moves on to the next reader (including MONAI's
default ``PILReader`` with ``reverse_indexing=True``, which loads a PNG *transposed*), and finally raises a multi-line
``RuntimeError`` that no longer carries the original exception. So the readers here never fail in ``read()`` (it only
records the file names); all decoding, conversion and checking happens in ``get_data()``, whose exceptions
``LoadImage`` lets through, and every problem becomes a one-line :class:`~bundle.errors.BundleInputError` naming the
file.

Config use::

    {"_target_": "LoadImaged", "keys": "image", "reader": "$bundle.data.readers.image_readers()", "image_only": true}
    {"_target_": "LoadImaged", "keys": "label", "reader": "$bundle.data.readers.mask_readers()", "image_only": true}

followed by ``EnsureChannelFirstd`` gives images ``[3, H, W]`` (values 0..255, float32 by LoadImage's default dtype)
and masks ``[1, H, W]`` (stored values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader, PILReader
from monai.utils import ensure_tuple
from PIL import Image

from ..errors import BundleInputError
from .tiff import decode_tiff

__all__ = [
    "PIL_SUFFIXES",
    "TIFF_SUFFIXES",
    "ImageFileReader",
    "TiffReader",
    "image_readers",
    "mask_readers",
    "to_label_image",
    "to_rgb",
]

PIL_SUFFIXES = ("png", "jpg", "jpeg", "bmp")
TIFF_SUFFIXES = ("tif", "tiff")
NO_CHANNEL = "no_channel"
_WHITE = 255.0


def _suffix(name: PathLike) -> str:
    return Path(str(name)).suffix.lower().lstrip(".")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no details"
    return f"{text} ({type(err).__name__})"


def _composite_on_white(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend ``values`` (H, W[, C], 0..255) over a white background with ``alpha`` (H, W, 0..255); uint8 result."""
    weight = alpha.astype(np.float32) / 255.0
    if values.ndim == 3:
        weight = weight[..., None]
    blended = values.astype(np.float32) * weight + _WHITE * (1.0 - weight)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map any numeric array to uint8: bool -> 0/255, integers by their type's full range (uint16 65535 -> 255),
    floats in [0, 1] scaled by 255, other floats taken as 0..255; negatives clip to 0."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.integer):
        top = float(np.iinfo(values.dtype).max)
        scaled = np.clip(values.astype(np.float64), 0, top) * (255.0 / top)
    else:
        scaled = values.astype(np.float64)
        finite = scaled[np.isfinite(scaled)]
        if finite.size and finite.max() <= 1.0:
            scaled = scaled * 255.0
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (usable as ``PILReader(converter=to_rgb)``).

    Transparency (RGBA, LA, PA, or a palette/``transparency`` entry) is composited on a white background - the
    colour of empty glass in a pathology slide - rather than dropped. 16/32-bit grayscale (``I;16*``, ``I``) is
    scaled by 255/65535, float (``F``) by 255 when its values lie in [0, 1]. CMYK, YCbCr, 1-bit, L and P go through
    Pillow's own conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))
        return Image.fromarray(_composite_on_white(rgba[..., :3], rgba[..., 3]), mode="RGB")
    if mode == "I" or mode.startswith("I;16"):
        gray = np.asarray(image).astype(np.int64)
        gray = np.clip(np.rint(np.clip(gray, 0, 65535) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    return image.convert("RGB")


def _mask_from_colour(values: np.ndarray, name: str) -> np.ndarray:
    """Reduce an (H, W, 3|4) mask to (H, W) when its red, green and blue values agree everywhere."""
    rgb = values[..., :3]
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise BundleInputError(
            f"mask {name} is a colour image whose red, green and blue values differ; "
            "save masks as single-channel images of class values (e.g. 0/255 or 0, 1, 2, ...)"
        )
    return np.ascontiguousarray(rgb[..., 0])


def to_label_image(image: Image.Image) -> Image.Image:
    """Make a PIL mask single-channel without changing its values (usable as ``PILReader(converter=...)``).

    ``L``, ``P`` (palette indices are kept, not mapped through the palette), ``I``, ``I;16*`` and ``F`` are returned
    as they are; ``1`` becomes ``L`` 0/255; the alpha of ``LA``/``PA`` is dropped; ``RGB``/``RGBA`` become ``L`` when
    red, green and blue are equal everywhere, otherwise :class:`BundleInputError` is raised. Other modes are refused.
    """
    mode = image.mode
    name = getattr(image, "filename", "") or "<in-memory image>"
    if mode in ("L", "P", "I", "F") or mode.startswith("I;16"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("LA", "PA", "La"):
        return image.getchannel(0)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        return Image.fromarray(_mask_from_colour(np.asarray(image), name), mode="L")
    raise BundleInputError(f"mask {name} has unsupported image mode {mode!r}; use a single-channel (L/P/I;16) image")


@dataclass(frozen=True)
class _PendingFile:
    """A file name recorded by ``read()``; decoding happens in ``get_data()`` (see the module docstring)."""

    name: str


class TiffReader(ImageReader):
    """Read ``.tif``/``.tiff`` files with tifffile (series 0, pyramid level 0) as (H, W[, C]) arrays.

    Args:
        rgb: ``True`` for images: the result is (H, W, 3) uint8 - grayscale is repeated to three channels, alpha is
            composited on white, palette images get their colour map, min-is-white grayscale is inverted, 16-bit and
            float data are scaled to 0..255 (see :func:`_scale_to_uint8`). ``False`` for masks: the result is (H, W)
            with the stored dtype and values (palette indices kept); a mask with 3/4 channels is accepted only when
            its first three channels are equal.

    ``read()`` only records the names; decoding errors surface in ``get_data()`` as :class:`BundleInputError`.
    The meta dict has the same keys as :class:`ImageFileReader`'s for PNG/JPEG/BMP, so batches may mix formats.
    """

    def __init__(self, rgb: bool = True) -> None:
        super().__init__()
        self.rgb = rgb

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(_suffix(name) in TIFF_SUFFIXES for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> _PendingFile | list[_PendingFile]:
        names = ensure_tuple(data)
        for name in names:
            if _suffix(name) not in TIFF_SUFFIXES:
                raise ValueError(f"TiffReader reads only .tif/.tiff files, not {name}")
        pending = [_PendingFile(str(name)) for name in names]
        return pending if len(pending) > 1 else pending[0]

    def get_data(self, img: _PendingFile | Sequence[_PendingFile]) -> tuple[np.ndarray, dict]:
        names = [item.name for item in ensure_tuple(img)]
        return _stack([self.load_file(name) for name in names], names)

    def load_file(self, name: str) -> tuple[np.ndarray, dict]:
        """Decode one TIFF file into (array, meta); :class:`BundleInputError` if that is impossible."""
        try:
            decoded = decode_tiff(name)
        except BundleInputError:
            raise
        except FileNotFoundError:
            raise BundleInputError(f"{'image' if self.rgb else 'mask'} file {name} does not exist") from None
        except Exception as err:  # tifffile raises TiffFileError, ValueError, OSError, KeyError, ...
            raise BundleInputError(f"cannot read TIFF file {name}: {_one_line(err)}") from err
        array, photometric_name, colormap = decoded.array, decoded.photometric, decoded.colormap
        if photometric_name in ("SEPARATED", "CIELAB", "ICCLAB", "ITULAB"):
            raise BundleInputError(f"TIFF {name} uses the {photometric_name} colour space; save it as RGB or grayscale")
        if self.rgb:
            array = self.as_rgb(array, photometric_name, colormap)
            mode = "RGB"
        else:
            array = self._as_label(array, name)
            mode = {np.dtype(np.uint8): "L", np.dtype(np.uint16): "I;16"}.get(array.dtype, str(array.dtype))
        height, width = array.shape[:2]
        meta = {
            "format": "TIFF",
            "mode": mode,
            "width": width,
            "height": height,
            "spatial_shape": np.asarray((height, width)),
            "original_channel_dim": -1 if array.ndim == 3 else NO_CHANNEL,
        }
        return array, meta

    @staticmethod
    def as_rgb(array: np.ndarray, photometric: str, colormap: np.ndarray | None) -> np.ndarray:
        """A decoded TIFF array (H, W[, S]) with its photometric name and colour map -> (H, W, 3) uint8 RGB."""
        if photometric == "PALETTE" and colormap is not None and array.ndim == 2:
            array = np.moveaxis(np.asarray(colormap)[:, array], 0, -1)  # (3, 2**bits) map -> (H, W, 3)
        if photometric == "MINISWHITE" and array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
            array = np.iinfo(array.dtype).max - array
        array = _scale_to_uint8(array)
        if array.ndim == 2:
            return np.repeat(array[..., None], 3, axis=-1)
        channels = array.shape[-1]
        if channels == 1:
            return np.repeat(array, 3, axis=-1)
        if channels == 2:  # gray + alpha
            return np.repeat(_composite_on_white(array[..., 0], array[..., 1])[..., None], 3, axis=-1)
        if channels == 4:  # RGBA
            return _composite_on_white(array[..., :3], array[..., 3])
        return array

    @staticmethod
    def _as_label(array: np.ndarray, name: str) -> np.ndarray:
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        if array.ndim == 2:
            return array
        if array.shape[-1] <= 2:  # single channel (+ alpha)
            return np.ascontiguousarray(array[..., 0])
        return _mask_from_colour(array, name)


class ImageFileReader(ImageReader):
    """Read PNG/JPEG/BMP with MONAI's ``PILReader(reverse_indexing=False)`` and TIFF with :class:`TiffReader`.

    Args:
        rgb: ``True`` for images (converter :func:`to_rgb`, (H, W, 3) uint8), ``False`` for masks (converter
            :func:`to_label_image`, (H, W) with the stored values).

    ``read()`` never fails (it records names), so ``LoadImage`` never falls back to its default readers; ``get_data``
    raises :class:`BundleInputError` for a missing, unsupported, unreadable or truncated file. The meta dict holds
    ``format``, ``mode``, ``width``, ``height``, ``spatial_shape`` = (H, W) (the array's order; MONAI's PILReader
    would give (W, H)) and ``original_channel_dim`` (-1, or ``"no_channel"`` for masks).
    """

    def __init__(self, rgb: bool = True) -> None:
        super().__init__()
        self.rgb = rgb
        self.pil_reader = PILReader(converter=to_rgb if rgb else to_label_image, reverse_indexing=False)
        self.tiff_reader = TiffReader(rgb=rgb)

    @property
    def kind(self) -> str:
        return "image" if self.rgb else "mask"

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(_suffix(name) in PIL_SUFFIXES + TIFF_SUFFIXES for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> _PendingFile | list[_PendingFile]:
        pending = [_PendingFile(str(name)) for name in ensure_tuple(data)]
        return pending if len(pending) > 1 else pending[0]

    def get_data(self, img: _PendingFile | Sequence[_PendingFile]) -> tuple[np.ndarray, dict]:
        names = [item.name for item in ensure_tuple(img)]
        return _stack([self.load_file(name) for name in names], names)

    def load_file(self, name: str) -> tuple[np.ndarray, dict]:
        """Decode one file into (array, meta); :class:`BundleInputError` if that is impossible."""
        suffix = _suffix(name)
        if suffix not in PIL_SUFFIXES + TIFF_SUFFIXES:
            supported = ", ".join(PIL_SUFFIXES + TIFF_SUFFIXES)
            raise BundleInputError(f"{self.kind} file {name} has an unsupported type '.{suffix}' (use {supported})")
        if not Path(name).is_file():
            raise BundleInputError(f"{self.kind} file {name} does not exist")
        if suffix in TIFF_SUFFIXES:
            return self.tiff_reader.load_file(name)
        try:
            array, meta = self.pil_reader.get_data(self.pil_reader.read(name))
            array = np.asarray(array)
        except BundleInputError:
            raise
        except Exception as err:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, ...
            raise BundleInputError(f"cannot read {self.kind} file {name}: {_one_line(err)}") from err
        if self.rgb and (array.ndim != 3 or array.shape[-1] != 3):  # to_rgb guarantees this; keep the contract
            raise BundleInputError(f"image file {name} decoded to shape {array.shape}, expected (H, W, 3)")
        height, width = array.shape[:2]
        meta = {key: meta[key] for key in ("format", "mode", "width", "height")}
        meta["spatial_shape"] = np.asarray((height, width))
        meta["original_channel_dim"] = -1 if array.ndim == 3 else NO_CHANNEL
        return array, meta


def _stack(loaded: list[tuple[np.ndarray, dict]], names: list[str]) -> tuple[np.ndarray, dict]:
    """One file: as it is. Several (MONAI's multi-file loading): concatenate channels, or stack a new first axis."""
    array, meta = loaded[0]
    if len(loaded) == 1:
        return array, meta
    shapes = {tuple(a.shape) for a, _ in loaded}
    if len(shapes) > 1:
        raise BundleInputError(f"files {', '.join(names)} cannot be stacked: their shapes differ ({sorted(shapes)})")
    if meta["original_channel_dim"] == NO_CHANNEL:
        return np.stack([a for a, _ in loaded], axis=0), {**meta, "original_channel_dim": 0}
    return np.concatenate([a for a, _ in loaded], axis=-1), meta


def image_readers() -> list[ImageReader]:
    """Readers for ``LoadImaged(keys="image", reader=...)``: PNG/JPEG/BMP/TIFF as (H, W, 3) uint8 RGB."""
    return [ImageFileReader(rgb=True)]


def mask_readers() -> list[ImageReader]:
    """Readers for ``LoadImaged(keys="label", reader=...)``: PNG/BMP/TIFF masks as (H, W) with their stored values."""
    return [ImageFileReader(rgb=False)]
