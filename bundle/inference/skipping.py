"""``--on_error``: what inference does with an image it cannot read - stop (the default) or skip it and go on.

With ``stop`` the first unreadable image ends the run with one ``error:`` line naming it. With ``skip`` every
readable image is segmented; each unreadable one is left out with a one-line ``warning:`` naming it and why, the
list is printed at the end and written to ``<output_dir>/skipped.csv`` (``image,reason``), and the run still exits
with status 1 (``error: 2 of 5 images could not be read (listed in ...)``), so that a script never mistakes a
partial run for a complete one.

Where each image is found unreadable, with ``skip``:

- its header, when the inputs are listed (:func:`~bundle.inference.inputs.inference_inputs`): a zero-byte file, a
  file that is not an image, a TIFF without a 2D image;
- whole-image path (``large_image_pixels`` or fewer): decoded once, whole, before the evaluator starts
  (:func:`readable_items`). A truncated PNG/JPEG has a valid header and fails only when it is decoded; catching that
  inside MONAI's ``LoadImaged`` would mean a ``Dataset`` item that is not an image in the middle of an ignite epoch
  (run in ``DataLoader`` workers, counted by the progress bar). Decoding up front keeps the evaluator's dataset
  made of readable images only; it costs one extra decode per image (such an image is at most
  ``large_image_pixels`` x 3 bytes, one at a time) and only with ``skip``: ``stop`` reads every image once, as before;
- large-image path: never decoded up front (a TIFF there is read tile by tile, a whole decode is what the path
  avoids). :class:`~bundle.inference.large_images.LargeImageSegmenter` catches :class:`UnreadableImage` raised while
  reading one image, removes that image's partial outputs and goes on with the next.

An image that becomes unreadable after these checks (changed while the run goes on) stops the run as with ``stop``.
Write errors are never skipped: they stop the run (:func:`~bundle.inference.writers.output_file`).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..data.readers import ImageFileReader
from ..errors import BundleInputError
from .writers import output_file

__all__ = [
    "ON_ERROR_CHOICES",
    "SKIPPED_FILENAME",
    "SkippedImages",
    "UnreadableImage",
    "check_on_error",
    "readable_items",
    "skipping",
]

ON_ERROR_CHOICES = ("stop", "skip")
SKIPPED_FILENAME = "skipped.csv"


class UnreadableImage(BundleInputError):
    """An input image cannot be read or decoded (as opposed to an output that cannot be written)."""


def check_on_error(on_error: Any) -> str:
    """``on_error`` if it is ``stop`` or ``skip``; otherwise :class:`BundleInputError` naming ``--on_error``."""
    if not isinstance(on_error, str) or on_error not in ON_ERROR_CHOICES:
        raise BundleInputError(f"--on_error must be {' or '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    return on_error


def _reason(path: str, error: BaseException) -> str:
    """The error's message without a leading ``... <path>: `` (the path is given next to it)."""
    message = " ".join(str(error).split())
    _, found, rest = message.partition(f"{path}: ")
    return rest if found and rest else message


class SkippedImages:
    """The images a run left out with ``--on_error skip`` (shared by the inputs, the evaluator's dataset and the
    large-image path of ``configs/inference.json``), and the report at the end of the run.

    Args:
        on_error: ``stop`` (nothing is skipped: callers re-raise) or ``skip``.
        output_dir: where :meth:`report` writes ``skipped.csv``.
    """

    def __init__(self, on_error: str = "stop", output_dir: str | os.PathLike = ".") -> None:
        self.skip = check_on_error(on_error) == "skip"
        self.output_dir = os.fspath(output_dir)
        self.skipped: list[tuple[str, str]] = []
        self.inputs: dict[str, int] = {}

    def listed(self, paths: Sequence[str]) -> None:
        """The run's input images (for the count in the final error and the order of the list)."""
        self.inputs = {path: index for index, path in enumerate(paths)}

    @property
    def path(self) -> str:
        """The list of skipped images: ``<output_dir>/skipped.csv``."""
        return os.path.join(self.output_dir, SKIPPED_FILENAME)

    @property
    def output_files(self) -> list[str]:
        """Files of ``output_dir`` this object writes (for the overwrite check): ``skipped.csv`` with ``skip``."""
        return [SKIPPED_FILENAME] if self.skip else []

    def add(self, path: str, error: BaseException) -> None:
        """Record ``path`` as skipped because of ``error`` and print one ``warning:`` line."""
        reason = _reason(path, error)
        self.skipped.append((path, reason))
        sys.stderr.write(f"warning: skipping {path}: {reason}\n")
        sys.stderr.flush()

    def report(self) -> None:
        """With ``skip``: write ``skipped.csv`` (header only when nothing was skipped, so that the file always
        describes the last run), print the skipped images and raise one :class:`BundleInputError` if there are any."""
        if not self.skip:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        text = io.StringIO()
        table = csv.writer(text, lineterminator="\n")
        table.writerow(["image", "reason"])
        self.skipped.sort(key=lambda row: self.inputs.get(row[0], len(self.inputs)))  # stable: input order
        table.writerows(self.skipped)
        with output_file(self.path) as temp:
            with open(temp, "w", encoding="utf-8", newline="") as handle:
                handle.write(text.getvalue())
        if not self.skipped:
            return
        lines = [f"skipped {len(self.skipped)} image(s):"] + [f"  {path}: {reason}" for path, reason in self.skipped]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        total = max(len(self.inputs), len(self.skipped))
        raise BundleInputError(f"{len(self.skipped)} of {total} images could not be read (listed in {self.path})")


def skipping(errors: SkippedImages | None) -> bool:
    """Whether unreadable images are skipped (``errors`` given, with ``on_error`` ``skip``)."""
    return errors is not None and errors.skip


def readable_items(items: Sequence[dict[str, Any]], errors: SkippedImages | None = None) -> list[dict[str, Any]]:
    """``items`` as they are, or with ``skip`` the ones whose image decodes whole (the others recorded in ``errors``).

    The decode is the one ``LoadImaged`` does (the bundle's :class:`~bundle.data.readers.ImageFileReader`), so an
    image kept here loads in the evaluator. Meant for the whole-image path only (see the module docstring).
    """
    if not skipping(errors):
        return list(items)
    reader = ImageFileReader(rgb=True)
    kept = []
    for item in items:
        try:
            reader.load_file(item["image"])
        except BundleInputError as err:
            errors.add(item["image"], err)
            continue
        kept.append(item)
    return kept
