"""Checks a datalist gets when training or evaluation loads it, so that a hand-written one (that skipped
``python -m bundle.prepare``) fails at start-up with one line naming the file, not in a transform at a random batch.

:func:`check_list` runs once per list, from :func:`~bundle.data.datalist.load_datalist` and
:func:`~bundle.data.datalist.unlabeled_pool` when they are given :class:`DatalistChecks`:

- an image listed twice in a list, or in ``training`` and also in ``validation`` or ``test``, is an error;
- every image of ``training`` and ``unlabeled`` must be at least :func:`min_image_size` pixels per side: train.json's
  ``rescale`` (MONAI's ``Zoomd``, which floors ``side * image_scale``) turns a smaller one into 0 pixels and the run
  dies when it draws it (validation and test images are resized by ``ScaledInferer``, which keeps at least 1 pixel);
- in ``training``, ``validation`` and ``test`` a mask (and an instance mask) must have its image's size;
- masks are read with the training reader and turned into classes by the training ``MaskToClass``, so the classes
  checked are exactly those the loss sees: none may be ``>= num_classes``, and the ``training`` masks together must
  hold every class below ``num_classes`` (a class no mask has is never learnt, and validation Dice leaves a class
  without ground truth out, so nothing would show it).

Image sizes come from the file headers; masks are decoded (labelled lists are small), in threads.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BundleInputError

__all__ = ["DISJOINT_LISTS", "RESCALED_LISTS", "DatalistChecks", "check_list", "image_size", "min_image_size"]

# the labelled lists, with the lists an image of each must not also be in (an image trained on is no test of it)
DISJOINT_LISTS = {"training": ("validation", "test"), "validation": ("training",), "test": ("training",)}
# the lists that train.json's rescale (Zoomd) shrinks by image_scale
RESCALED_LISTS = ("training", "unlabeled")
_TIFF_SUFFIXES = (".tif", ".tiff")
_SHOWN_VALUES = 8


def min_image_size(image_scale: float) -> int:
    """The smallest image side that ``Zoomd(zoom=image_scale, keep_size=False)`` keeps at one pixel or more.

    MONAI sizes the result as ``floor(side * image_scale)``; the random zoom-crop and the validation inferer cope
    with any side of at least one pixel, so this is the smallest image the whole pipeline can handle.
    """
    scale = float(image_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise BundleInputError(f"image_scale must be a number > 0, got {image_scale!r}")
    size = max(1, math.ceil(1.0 / scale))
    while math.floor(float(size) * scale) < 1:  # floating-point rounding of 1 / scale
        size += 1
    while size > 1 and math.floor(float(size - 1) * scale) >= 1:
        size -= 1
    return size


@dataclass(frozen=True)
class DatalistChecks:
    """What loaded lists are checked against: the options the training pipeline gets (``num_classes``, how
    ``MaskToClassd`` turns mask values into classes, ``image_scale``). ``num_classes=None`` skips the class checks
    (masks are then not decoded, only their sizes read)."""

    num_classes: int | None = None
    mask_mode: str = "nonzero"
    mask_threshold: float = 127.0
    class_values: Sequence[float] | None = None
    image_scale: float = 1.0

    def __post_init__(self) -> None:
        num_classes = self.num_classes
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
            raise BundleInputError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
        if num_classes is not None and num_classes < 2:
            raise BundleInputError(f"num_classes must be a whole number >= 2, got {num_classes}")
        min_image_size(self.image_scale)  # refuses a bad scale

    @property
    def min_size(self) -> int:
        return min_image_size(self.image_scale)

    def mask_to_class(self):
        """The training pipeline's value -> class conversion (:class:`~bundle.data.transforms.MaskToClass`)."""
        from .transforms import MaskToClass  # torch: only when masks are checked

        return MaskToClass(mode=self.mask_mode, class_values=self.class_values, threshold=self.mask_threshold)

    def describe_mapping(self) -> str:
        """How mask values become classes, in words, for error messages."""
        if self.mask_mode == "values":
            values = ", ".join(_number(v) for v in self.class_values or ())
            return f"mask_mode 'values' makes the values {values} the classes 0, 1, ..."
        if self.mask_mode == "threshold":
            return f"mask_mode 'threshold' makes every value > {_number(self.mask_threshold)} class 1"
        return f"mask_mode {self.mask_mode!r} makes every value > 0 class 1"


def _as_checks(checks: DatalistChecks | Mapping[str, Any]) -> DatalistChecks:
    """``checks`` as :class:`DatalistChecks` (a config may give a plain mapping of its fields)."""
    if isinstance(checks, DatalistChecks):
        return checks
    if not isinstance(checks, Mapping):
        raise TypeError(f"datalist checks must be DatalistChecks or a mapping, got {type(checks).__name__}")
    return DatalistChecks(**checks)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{float(value):g}"


def _describe(values: Sequence[float] | np.ndarray) -> str:
    """``{0, 7, 255}`` (at most eight values shown)."""
    values = list(values)
    shown = ", ".join(_number(v) for v in values[:_SHOWN_VALUES])
    return "{" + shown + (", ..." if len(values) > _SHOWN_VALUES else "") + "}"


def _reason(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def image_size(path: str, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image file from its header only (PIL; tifffile's series 0, level 0 for TIFF)."""
    try:
        if os.path.splitext(path)[1].lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                level = tif.series[0].levels[0]
                shape, axes = level.shape, level.axes
            return int(shape[axes.index("X")]), int(shape[axes.index("Y")])
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # PIL: UnidentifiedImageError, OSError, ...; tifffile: TiffFileError, ValueError ...
        raise BundleInputError(f"{what} {path} cannot be read: {_reason(error)}") from error


def _size(path: str, what: str, where: str) -> tuple[int, int]:
    try:
        return image_size(path, what)
    except BundleInputError as error:
        raise BundleInputError(f"{where}: {error}") from error


@dataclass(frozen=True)
class _Found:
    """What one item's masks hold: its classes and its raw mask values (empty when classes are not checked)."""

    classes: frozenset
    values: frozenset


def _unique(array: np.ndarray) -> np.ndarray:
    """Sorted unique values; counting is ten times faster than sorting for class indices and 8/16-bit masks."""
    flat = array.reshape(-1)
    if flat.size and (np.issubdtype(flat.dtype, np.integer) or flat.dtype == bool):
        low, high = int(flat.min()), int(flat.max())
        if low >= 0 and high <= 65535:
            return np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False)))
    return np.unique(flat)


def _check_item(
    item: Mapping[str, Any], key: str, where: str, checks: DatalistChecks, converter: Callable | None
) -> _Found:
    image = item["image"]
    width, height = _size(image, "image", where)
    least = checks.min_size if key in RESCALED_LISTS else 1
    if min(width, height) < least:
        raise BundleInputError(
            f"{where}: image {image} has size {width}x{height}, below the minimum of {least}x{least} pixels "
            f"(image_scale {_number(checks.image_scale)} shrinks a side under {least} pixels to 0)"
        )
    if key not in DISJOINT_LISTS:  # an unlabelled image: its size is all that matters
        return _Found(frozenset(), frozenset())
    if "instance_label" in item:
        mask_width, mask_height = _size(item["instance_label"], "instance mask", where)
        if (mask_width, mask_height) != (width, height):
            raise BundleInputError(
                f"{where}: instance mask {item['instance_label']} has size {mask_width}x{mask_height} but its image "
                f"{image} has size {width}x{height}"
            )
    label = item.get("label")
    if label is None:
        return _Found(frozenset(), frozenset())
    if converter is None:
        mask_width, mask_height = _size(label, "mask", where)
        pixels = None
    else:
        from monai.data import MetaTensor

        from .readers import ImageFileReader

        try:
            pixels, _ = ImageFileReader(rgb=False).load_file(label)
        except BundleInputError as error:
            raise BundleInputError(f"{where}: {error}") from error
        mask_height, mask_width = pixels.shape[:2]
    if (mask_width, mask_height) != (width, height):
        raise BundleInputError(
            f"{where}: mask {label} has size {mask_width}x{mask_height} but its image {image} has size "
            f"{width}x{height}"
        )
    if pixels is None:
        return _Found(frozenset(), frozenset())
    # as in training: LoadImaged makes the reader's (H, W) float32 (its default dtype), EnsureChannelFirstd [1, H, W]
    loaded = MetaTensor(pixels[None].astype(np.float32), meta={"filename_or_obj": label})
    try:
        classes = np.asarray(converter(loaded))[0]
    except BundleInputError as error:
        raise BundleInputError(f"{where}: {error}") from error
    found = set(_unique(classes).tolist())
    largest = max(found)
    if largest >= checks.num_classes:
        raw = _unique(pixels[classes >= checks.num_classes])
        raise BundleInputError(
            f"{where}: mask {label} has class {largest} (mask values {_describe(raw)}) but num_classes is "
            f"{checks.num_classes}, so the classes are 0 to {checks.num_classes - 1}; {checks.describe_mapping()}"
        )
    return _Found(frozenset(found), frozenset(_unique(pixels).tolist()))


def _same_file(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _check_duplicates(
    items: Sequence[Mapping[str, Any]], key: str, datalist_path: str, others: Mapping[str, Sequence[str]]
) -> None:
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        name = _same_file(item["image"])
        if name in seen:
            raise BundleInputError(
                f"image {item['image']} is listed twice in {key!r} of {datalist_path} (items {seen[name]} and "
                f"{index}); list each image once"
            )
        seen[name] = index
    for other in DISJOINT_LISTS.get(key, ()):
        for other_index, path in enumerate(others.get(other, ())):
            index = seen.get(_same_file(path))
            if index is not None:
                raise BundleInputError(
                    f"image {items[index]['image']} is in both {key!r} (item {index}) and {other!r} (item "
                    f"{other_index}) of {datalist_path}; an image trained on must not be validated or tested on, "
                    "remove it from one list"
                )


def _map_in_order(check: Callable[[int], _Found], count: int) -> list[_Found]:
    """``[check(i) for i in range(count)]`` in threads (decoding releases the GIL); the first error in list order
    is raised and the remaining checks dropped."""
    if count <= 1:
        return [check(i) for i in range(count)]
    executor = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, count)))
    try:
        return list(executor.map(check, range(count)))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def check_list(
    items: Sequence[Mapping[str, Any]],
    key: str,
    datalist_path: str,
    checks: DatalistChecks | Mapping[str, Any],
    others: Mapping[str, Sequence[str]] | None = None,
) -> float:
    """Check the list ``key`` of ``datalist_path`` (items with absolute paths) as the module docstring says.

    ``others`` maps the other lists of the datalist to their absolute image paths (for the lists of
    :data:`DISJOINT_LISTS`). Raises :class:`BundleInputError` for the first problem; returns the seconds it took.
    """
    start = time.perf_counter()
    checks = _as_checks(checks)
    if key in DISJOINT_LISTS:
        _check_duplicates(items, key, datalist_path, others or {})
    converter = checks.mask_to_class() if checks.num_classes is not None and key in DISJOINT_LISTS else None

    def check(index: int) -> _Found:
        return _check_item(items[index], key, f"item {index} of {key!r} in {datalist_path}", checks, converter)

    found = _map_in_order(check, len(items))
    if key == "training" and checks.num_classes is not None and items:
        classes = set().union(*(f.classes for f in found))
        missing = sorted(set(range(checks.num_classes)) - classes)
        if missing:
            values = sorted(set().union(*(f.values for f in found)))
            absent = ("class " if len(missing) == 1 else "classes ") + ", ".join(str(c) for c in missing)
            raise BundleInputError(
                f"the masks of {key!r} in {datalist_path} hold the classes {_describe(sorted(classes))} but "
                f"num_classes is {checks.num_classes}: no training mask has {absent}; num_classes (with "
                f"class_names and class_descriptions) must match the classes of the masks ({checks.describe_mapping()}"
                f"; the masks hold the values {_describe(values)})"
            )
    return time.perf_counter() - start
