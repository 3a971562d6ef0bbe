"""Checks that every dataset preparer runs on each file before it goes into a datalist.

A preparer lists its files with :func:`files_by_stem` (two files with one name are an error naming both), opens
every image with :func:`inspect_image` (missing, empty, truncated, corrupt or non-image files are errors naming the
file) and every mask with :func:`check_mask` (same size as its image, single channel, the values its kind allows).
Images that are grayscale or carry transparency are accepted (the bundle's readers convert them to RGB, compositing
transparency on white) and summed up in one notice by :func:`colour_mode_notice`. :func:`check_all` runs such checks
in parallel and raises the first problem in list order. Every problem is a one-line
:class:`~bundle.errors.BundleInputError`; nothing here writes a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from bundle.data.tiff import decode_tiff
from bundle.errors import BundleInputError

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_COLOUR_RULES",
    "MASK_KINDS",
    "ImageInfo",
    "check_all",
    "check_mask",
    "colour_mode_notice",
    "describe_values",
    "files_by_stem",
    "inspect_image",
    "read_image",
    "read_mask",
]

# what the bundle's readers load (bundle.data.readers: PIL for PNG/JPEG/BMP, tifffile for TIFF)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
# binary: 0/255 or 0/1; instance: integer object ids >= 0 (0 is background); grey: 8-bit, foreground is > threshold
MASK_KINDS = ("binary", "instance", "grey")
# what check_mask does with an RGB(A) mask: refuse it, accept equal channels, or reduce it to its luma
MASK_COLOUR_RULES = ("refuse", "equal", "luma")
_LOSSY_SUFFIXES = (".jpg", ".jpeg")
_SHOWN_VALUES = 8
_SHOWN_NAMES = 3
_Item = TypeVar("_Item")


@dataclass(frozen=True)
class ImageInfo:
    """An image file that was opened and decoded (or, for PNG, verified to the end) without a problem."""

    path: str
    mode: str  # PIL mode ("RGB", "L", "RGBA", ...); for TIFF the equivalent of its samples
    size: tuple[int, int]  # (width, height)


def files_by_stem(
    folder: str,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    *,
    keep: Callable[[str], bool] | None = None,
    missing_ok: bool = False,
) -> dict[str, str]:
    """Map the stem of each file of ``folder`` with one of ``suffixes`` (any case) to its absolute path.

    Hidden files are skipped, and so are stems for which ``keep`` returns ``False``. Two files with the same stem
    (``a.png`` and ``a.jpg``) and a link to a missing file are errors that name the files. A missing ``folder``
    gives ``{}`` with ``missing_ok``, otherwise an error.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise BundleInputError(f"folder {os.path.abspath(folder)} does not exist") from None
    except NotADirectoryError:
        raise BundleInputError(f"{os.path.abspath(folder)} is not a folder") from None
    except OSError as error:
        raise BundleInputError(f"cannot list folder {os.path.abspath(folder)}: {error.strerror or error}") from error
    found: dict[str, str] = {}
    for entry in entries:
        stem, suffix = os.path.splitext(entry.name)
        if entry.name.startswith(".") or suffix.lower() not in suffixes or (keep is not None and not keep(stem)):
            continue
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise BundleInputError(f"{os.path.abspath(entry.path)} is a link to a missing file")
        if not entry.is_file():
            continue
        if stem in found:
            raise BundleInputError(
                f"two files for {stem} in {os.path.abspath(folder)}: {found[stem]} and "
                f"{os.path.abspath(entry.path)}; keep only one"
            )
        found[stem] = os.path.abspath(entry.path)
    return found


def _unreadable(what: str, path: str, error: Exception) -> BundleInputError:
    if isinstance(error, UnidentifiedImageError):
        reason = "not a recognised image format"
    else:
        reason = " ".join(str(error).split()) or type(error).__name__
    return BundleInputError(f"{what} {path} cannot be read (corrupt, truncated or not an image: {reason})")


def _check_file(what: str, path: str) -> None:
    if not os.path.exists(path):
        raise BundleInputError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise BundleInputError(f"{what} {path} is not a file")
    if os.path.getsize(path) == 0:
        raise BundleInputError(f"{what} {path} is empty (0 bytes)")


def _tiff_mode(array: np.ndarray, photometric: str) -> str:
    """The PIL mode that matches a decoded TIFF array (H, W[, S])."""
    samples = array.shape[2] if array.ndim == 3 else 1
    if samples == 1:
        if photometric == "PALETTE":
            return "P"
        return "L" if array.dtype == np.uint8 else "I;16" if array.dtype == np.uint16 else "F"
    return {2: "LA", 3: "RGB", 4: "RGBA"}.get(samples, f"{samples} samples")


def _read_tiff(what: str, path: str) -> tuple[np.ndarray, str]:
    """Decode a TIFF file with the bundle's TIFF decoder; (H, W[, S]) array and its mode."""
    try:
        decoded = decode_tiff(path)
    except BundleInputError:
        raise
    except Exception as error:  # tifffile raises TiffFileError, ValueError, OSError, KeyError, ...
        raise _unreadable(what, path, error) from error
    return decoded.array, _tiff_mode(decoded.array, decoded.photometric)


def _pil_mode(image: Image.Image) -> str:
    """The image's mode, with ``+transparency`` for an L/RGB/P image that has a transparent colour."""
    if "transparency" in image.info and image.mode in ("L", "RGB", "P"):
        return image.mode + "+transparency"
    return image.mode


def inspect_image(path: str, what: str = "image") -> ImageInfo:
    """Mode and size of an image file, after checking that the whole file is intact.

    PNG files are verified chunk by chunk (every CRC up to the end marker, which catches truncation and corruption
    without decompressing the pixels, about 20 times faster); TIFF files are decoded with tifffile, as the bundle's
    reader does; other formats are decoded with PIL.
    """
    _check_file(what, path)
    if os.path.splitext(path)[1].lower() in TIFF_SUFFIXES:
        array, mode = _read_tiff(what, path)
        return ImageInfo(path, mode, (int(array.shape[1]), int(array.shape[0])))
    png = False
    try:
        with Image.open(path) as image:
            mode, size = _pil_mode(image), image.size
            png = image.format == "PNG"
            if png:
                image.verify()
            else:
                image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        if not png:
            raise _unreadable(what, path, error) from error
        _decode_png(what, path, error)
    return ImageInfo(path, mode, size)


def _decode_png(what: str, path: str, verify_error: Exception) -> None:
    """A PNG that failed the chunk check is accepted when its pixels decode completely, as training reads them (a
    checksum that does not match, e.g. from a tool that rewrote a chunk, leaves the pixels intact)."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:
        raise _unreadable(what, path, error) from verify_error


def read_image(path: str, what: str = "image") -> tuple[ImageInfo, np.ndarray]:
    """Decode an image file completely: its :class:`ImageInfo` and its pixels (H, W[, C]) in the file's own mode."""
    _check_file(what, path)
    if os.path.splitext(path)[1].lower() in TIFF_SUFFIXES:
        array, mode = _read_tiff(what, path)
        return ImageInfo(path, mode, (int(array.shape[1]), int(array.shape[0]))), array
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode + (
                "+transparency" if "transparency" in image.info and image.mode in ("L", "RGB", "P") else ""
            )
            return ImageInfo(path, mode, image.size), np.asarray(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise _unreadable(what, path, error) from error


def read_mask(path: str, what: str = "mask") -> tuple[np.ndarray, str]:
    """Decode a mask file; its values as an (H, W[, C]) array (PIL's palette indices are kept) and its mode."""
    _check_file(what, path)
    if os.path.splitext(path)[1].lower() in TIFF_SUFFIXES:
        return _read_tiff(what, path)
    try:
        with Image.open(path) as mask:
            mask.load()
            return np.asarray(mask), mask.mode
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise _unreadable(what, path, error) from error


def describe_values(values: np.ndarray) -> str:
    """``{0, 7, 255}`` for sorted unique values (at most eight shown)."""
    shown = ", ".join(str(int(value)) for value in values[:_SHOWN_VALUES])
    return "{" + shown + (", ..." if len(values) > _SHOWN_VALUES else "") + "}"


def _unique_values(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8 or pixels.dtype == bool:
        return np.flatnonzero(np.bincount(pixels.reshape(-1).astype(np.uint8), minlength=256))
    return np.unique(pixels)


def _single_channel(pixels: np.ndarray, mode: str, path: str, colour: str) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels
    if colour != "refuse" and pixels.ndim == 3 and pixels.shape[2] in (2, 3, 4):
        if pixels.shape[2] == 2:  # grey + alpha
            return pixels[..., 0]
        rgb = pixels[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
        if colour == "luma" and rgb.dtype == np.uint8:
            return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").convert("L"))
        raise BundleInputError(
            f"mask {path} is a colour image whose red, green and blue values differ; expected a single-channel "
            "label image (or three equal channels)"
        )
    raise BundleInputError(f"mask {path} has {mode} pixels; expected a single-channel label image")


def check_mask(
    path: str,
    image: ImageInfo,
    kind: str,
    *,
    threshold: int = 127,
    colour: str = "equal",
) -> np.ndarray:
    """Check the mask of ``image`` and return its single-channel values (H, W).

    ``kind`` is one of :data:`MASK_KINDS`: ``"binary"`` allows only 0 and 255 (or 0 and 1); ``"instance"`` allows
    integer ids >= 0; ``"grey"`` allows any 8-bit value, foreground being ``> threshold`` (anti-aliased or JPEG
    edges), but a lossless mask (PNG, BMP, TIFF) with non-zero values none of which is above ``threshold`` (a 0/1 or
    0, 1, 2 label image) is an error, since it would become all background. ``colour`` says what to do with an
    RGB(A) mask: ``"refuse"`` it, accept it when its three channels are ``"equal"`` everywhere (as the bundle's mask
    reader does), or reduce it to its ``"luma"`` (JPEG masks whose chroma noise makes the channels differ).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    if colour not in MASK_COLOUR_RULES:
        raise ValueError(f"mask colour rule must be one of {MASK_COLOUR_RULES}, got {colour!r}")
    pixels, mode = read_mask(path)
    height, width = pixels.shape[:2]
    if (width, height) != image.size:
        raise BundleInputError(
            f"mask {path} has size {width}x{height} but its image {image.path} has size "
            f"{image.size[0]}x{image.size[1]}"
        )
    pixels = _single_channel(pixels, mode, path, colour)
    if not (np.issubdtype(pixels.dtype, np.integer) or pixels.dtype == bool):
        raise BundleInputError(f"mask {path} has {pixels.dtype} pixels; expected integer labels")
    values = _unique_values(pixels)
    found = set(values.tolist())
    if kind == "binary":
        if not (found <= {0, 255} or found <= {0, 1}):
            raise BundleInputError(
                f"mask {path} has values {describe_values(values)}; a binary mask may hold only 0 and 255 (or 0 and 1)"
            )
    elif kind == "instance":
        if values.size and values[0] < 0:
            negative = describe_values(values[values < 0])
            raise BundleInputError(f"instance mask {path} has negative values {negative}; expected object ids >= 0")
    else:
        if pixels.dtype not in (np.uint8, bool):
            raise BundleInputError(
                f"mask {path} has {pixels.dtype} pixels; expected an 8-bit grey mask (0 and 255, foreground > "
                f"{threshold})"
            )
        lossless = os.path.splitext(path)[1].lower() not in _LOSSY_SUFFIXES
        if lossless and values.size and values[-1] > 0 and values[-1] <= threshold:
            raise BundleInputError(
                f"mask {path} has values {describe_values(values)}, none above {threshold}: it would be all "
                f"background; expected a grey 0/255 mask whose foreground is > {threshold}"
            )
    return pixels


def colour_mode_notice(images: Iterable[ImageInfo]) -> str | None:
    """One line about the images that are not plain RGB (grayscale, with transparency, palette), or ``None``.

    They are accepted: the bundle's readers convert them to RGB (transparency composited on white).
    """
    images = list(images)
    converted = [image for image in images if image.mode != "RGB"]
    if not converted:
        return None
    transparent = sum(1 for image in converted if "A" in image.mode or "transparency" in image.mode)
    grey = sum(1 for image in converted if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"))
    kinds = [f"{grey} grayscale"] if grey else []
    kinds += [f"{transparent} with transparency (RGBA)"] if transparent else []
    other = len(converted) - grey - transparent
    kinds += [f"{other} palette or other"] if other else []
    shown = ", ".join(f"{image.path} ({image.mode})" for image in converted[:_SHOWN_NAMES])
    more = f" and {len(converted) - _SHOWN_NAMES} more" if len(converted) > _SHOWN_NAMES else ""
    return (
        f"{len(converted)} of {len(images)} images are not RGB ({', '.join(kinds)}); they are converted to RGB when "
        f"loaded (transparency on white): {shown}{more}"
    )


def check_all(check: Callable[[_Item], object], items: Sequence[_Item]) -> list:
    """``[check(item) for item in items]`` in parallel threads (decoding releases the GIL).

    The first problem in list order is raised and the remaining checks are dropped.
    """
    executor = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        return list(executor.map(check, items))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
