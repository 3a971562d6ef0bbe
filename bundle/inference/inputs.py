"""What to segment: the images named by ``--dataset_dir`` (a folder, one image file, or a datalist), checked up front.

:func:`inference_inputs` turns the user's ``dataset_dir`` into ``[{"image": path}, ...]`` and reports every problem
(a missing path, a folder without images, an unsupported or unreadable file, two inputs that would write the same
output) as one :class:`~bundle.errors.BundleInputError` line naming the file (with ``--on_error skip`` an unreadable
file is left out instead, see :mod:`bundle.inference.skipping`). Only the file headers are read here;
:func:`image_size` gives the (height, width) used by :func:`filter_by_size` to send very large images to the
tiled path (:mod:`bundle.inference.large_images`) instead of loading them whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tifffile
from PIL import Image

from ..data.datalist import DATALIST_FILENAME, load_datalist
from ..data.readers import PIL_SUFFIXES, TIFF_SUFFIXES
from ..errors import BundleInputError

if TYPE_CHECKING:
    from .skipping import SkippedImages

__all__ = ["IMAGE_SUFFIXES", "filter_by_size", "image_size", "inference_inputs", "is_tiff"]

IMAGE_SUFFIXES = tuple(f".{suffix}" for suffix in PIL_SUFFIXES + TIFF_SUFFIXES)
OUTPUT_POSTFIXES = ("_mask", "_prob")

logger = logging.getLogger(__name__)


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_tiff(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a ``.tif``/``.tiff`` suffix."""
    return _suffix(os.fspath(path)).lstrip(".") in TIFF_SUFFIXES


def _one_line(err: BaseException) -> str:
    return f"{' '.join(str(err).split()) or 'no details'} ({type(err).__name__})"


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, from its header only; :class:`BundleInputError` if it cannot be read.

    TIFF: series 0, full-resolution level (what the bundle's readers decode); PNG/JPEG/BMP: Pillow's header.
    """
    path = os.fspath(path)
    try:
        if is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                level = tif.series[0].levels[0]
                axes, shape = level.axes, level.shape
            if "Y" not in axes or "X" not in axes:
                raise BundleInputError(f"image file {path} has TIFF axes {axes!r}; expected a 2D image")
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        with Image.open(path) as image:
            width, height = image.size
        return int(height), int(width)
    except BundleInputError:
        raise
    except FileNotFoundError:
        raise BundleInputError(f"image file {path} does not exist") from None
    except Exception as err:  # PIL: UnidentifiedImageError, OSError, DecompressionBombError; tifffile: TiffFileError
        raise BundleInputError(f"cannot read image file {path}: {_one_line(err)}") from err


def _is_output(name: str) -> bool:
    return os.path.splitext(name)[0].endswith(OUTPUT_POSTFIXES)


def _folder_images(folder: str, recursive: bool, exclude: Sequence[str]) -> list[str]:
    """Supported image files of ``folder`` (sorted). Hidden files and folders and ``exclude`` folders are skipped;
    when an excluded folder is searched anyway (the output folder is the input folder), so are the bundle's own
    outputs (``*_mask.*``, ``*_prob.*``)."""
    excluded = {os.path.realpath(path) for path in exclude}
    found, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            name
            for name in dirs
            if not name.startswith(".") and os.path.realpath(os.path.join(root, name)) not in excluded
        )
        outputs_here = os.path.realpath(root) in excluded
        for name in sorted(files):
            if name.startswith(".") or (outputs_here and _is_output(name)):
                continue
            (found if _suffix(name) in IMAGE_SUFFIXES else skipped).append(os.path.join(root, name))
        if not recursive:
            break
    if skipped:
        logger.info("skipping %d file(s) that are not images in %s, e.g. %s", len(skipped), folder, skipped[0])
    return found


def _check_unique_outputs(paths: list[str], root: str | None) -> None:
    """Two inputs must not write the same ``<stem>_mask`` file (same name, different suffix or folder)."""
    seen: dict[str, str] = {}
    for path in paths:
        key = os.path.splitext(os.path.relpath(path, root) if root else os.path.basename(path))[0]
        if key in seen:
            raise BundleInputError(
                f"images {seen[key]} and {path} would write the same output {key}_mask; rename one of them"
            )
        seen[key] = path


def inference_inputs(
    source: str | os.PathLike,
    recursive: bool = False,
    datalist_key: str = "test",
    exclude: Sequence[str | os.PathLike] = (),
    errors: SkippedImages | None = None,
) -> list[dict[str, Any]]:
    """The images to segment, as ``[{"image": absolute_path}, ...]``.

    Args:
        source: a folder of images (PNG, JPEG, BMP, TIFF; other files are skipped), a single image file, a folder
            holding ``datalist.json`` or the ``datalist.json`` file itself (then the ``datalist_key`` list is used).
        recursive: also search the sub-folders of a folder (outputs then keep the sub-folder layout).
        datalist_key: the datalist list to segment.
        exclude: folders not searched (the output folder when it lies inside ``source``); if ``source`` itself is
            one of them, only the bundle's outputs in it (``*_mask.*``, ``*_prob.*``) are skipped.
        errors: with ``on_error`` ``skip``, an image whose header cannot be read is recorded there and left out.

    Every header is read once, so a file that is not an image of a supported type fails here, before any work,
    with a :class:`BundleInputError` naming it.
    """
    source = os.path.abspath(os.path.expanduser(os.fspath(source)))
    if not os.path.exists(source):
        raise BundleInputError(f"input {source} does not exist; give an image file, a folder of images or a datalist")
    root: str | None = None
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, DATALIST_FILENAME)):
        paths = [item["image"] for item in load_datalist(source, datalist_key, require_label=False)]
    elif os.path.isfile(source) and os.path.basename(source) == DATALIST_FILENAME:
        paths = [item["image"] for item in load_datalist(os.path.dirname(source), datalist_key, require_label=False)]
    elif os.path.isdir(source):
        paths = _folder_images(source, recursive, [os.path.abspath(os.fspath(path)) for path in exclude])
        if not paths:
            where = "or its sub-folders " if recursive else ""
            raise BundleInputError(f"no images in the folder {source} {where}(supported: {', '.join(IMAGE_SUFFIXES)})")
        root = source if recursive else None
    else:
        if _suffix(source) not in IMAGE_SUFFIXES:
            raise BundleInputError(
                f"input {source} has an unsupported type '{_suffix(source) or 'no suffix'}' "
                f"(use {', '.join(IMAGE_SUFFIXES)}, a folder of images or a {DATALIST_FILENAME})"
            )
        paths = [source]
    readable = []
    for path in paths:
        try:
            image_size(path)
        except BundleInputError as err:
            if errors is None or not errors.skip:
                raise
            errors.add(path, err)
            continue
        readable.append(path)
    if errors is not None:
        errors.listed(paths)
    _check_unique_outputs(readable, root)
    return [{"image": path} for path in readable]


def filter_by_size(items: Sequence[dict[str, Any]], max_pixels: int | None, large: bool = False) -> list[dict]:
    """The items whose image has at most ``max_pixels`` pixels (``large=False``) or more (``large=True``).

    ``max_pixels`` None or <= 0 means no limit: every item is small.
    """
    if not max_pixels or max_pixels <= 0:
        return [] if large else list(items)
    selected = []
    for item in items:
        height, width = image_size(item["image"])
        if (height * width > max_pixels) == large:
            selected.append(item)
    return selected
