"""Preparation of the GlaS (Warwick-QU) gland segmentation dataset: its semi-supervised splits and datalist.

Two source layouts are detected automatically (``<name>`` is ``train_N``, ``testA_N`` or ``testB_N``):

- a PNG copy: ``images/<name>.png`` and ``masks/<name>.png`` (binary masks, 0/255 or 0/1);
- the official Warwick release: ``<name>.bmp`` and ``<name>_anno.bmp`` (instance masks, one integer id per gland)
  in one folder, possibly inside one nested folder such as ``Warwick QU Dataset (Released 2016_07_08)``, or
  ``images/<name>.bmp`` with ``masks/<name>_anno.bmp``.

The split is the one used in the semi-supervised literature: 12 fixed validation images from ``train``, 7 (10 %)
or 14 (20 %) fixed labelled images, the rest of ``train`` unlabelled, and all 80 ``testA``/``testB`` images as test.
Every file that goes into the datalist is opened and checked (readable, mask size equals image size, expected mask
values) so that problems surface here, as one line naming the file, and not hours into a training run. Nothing is
ever written into the source folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from bundle.errors import BundleInputError
from bundle.prepare.checks import check_all, check_mask, files_by_stem, inspect_image
from bundle.prepare.output import check_output, check_source, write_prepared

__all__ = [
    "GLAS_CLASS_NAMES",
    "GLAS_PARTS",
    "GLAS_LABELLED_NAMES",
    "GLAS_SPLITS",
    "GLAS_VALIDATION_NAMES",
    "GlasCase",
    "build_glas_datalist",
    "find_glas_cases",
    "prepare_glas",
]

GLAS_PARTS = ("train", "testA", "testB")
GLAS_CLASS_NAMES = ("background", "gland")
GLAS_SPLITS = (10, 20, 100)
GLAS_VALIDATION_NAMES = (
    "train_27",
    "train_33",
    "train_37",
    "train_45",
    "train_54",
    "train_62",
    "train_63",
    "train_66",
    "train_7",
    "train_71",
    "train_76",
    "train_82",
)
_LABELLED_10 = ("train_17", "train_23", "train_28", "train_4", "train_60", "train_74", "train_85")
GLAS_LABELLED_NAMES = {
    10: _LABELLED_10,
    20: _LABELLED_10 + ("train_20", "train_42", "train_52", "train_55", "train_69", "train_70", "train_9"),
}
_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
_NAME = re.compile(r"^(train|testA|testB)_(\d+)$")
_INSTANCE_SUFFIX = "_anno"
_SKIPPED_FOLDERS = ("__MACOSX",)
_LAYOUT_HINT = (
    "expected images/<name>.png with masks/<name>.png, or the official <name>.bmp with <name>_anno.bmp, "
    "where <name> is train_N, testA_N or testB_N"
)


@dataclass(frozen=True)
class GlasCase:
    """One GlaS image found in the source, with its mask if there is one."""

    name: str  # e.g. "train_17"
    part: str  # "train", "testA" or "testB"
    number: int
    image: str  # absolute path
    mask: str | None  # absolute path, None when the source has no mask for this image
    label_type: str | None  # "binary" (<name> mask), "instance" (<name>_anno mask), None without a mask
    mask_folder: str  # where the mask was looked for

    @property
    def sort_key(self) -> tuple[int, int]:
        """Natural order: by part (train, testA, testB), then by number (train_2 before train_10)."""
        return GLAS_PARTS.index(self.part), self.number


def _files_by_stem(folder: str) -> dict[str, str]:
    """Map the stem of each GlaS image or mask file in ``folder`` to its path (one per stem); others are ignored."""
    return files_by_stem(
        folder, _EXTENSIONS, keep=lambda stem: bool(_NAME.match(stem.removesuffix(_INSTANCE_SUFFIX))), missing_ok=True
    )


def _cases_in(image_dir: str, mask_dir: str) -> list[GlasCase]:
    files = _files_by_stem(image_dir)
    masks = files if mask_dir == image_dir else _files_by_stem(mask_dir)
    cases = []
    for stem, image in files.items():
        match = _NAME.match(stem)
        if match is None:
            continue
        instance_mask = masks.get(stem + _INSTANCE_SUFFIX)
        binary_mask = masks.get(stem) if mask_dir != image_dir else None
        if instance_mask and binary_mask:
            raise BundleInputError(
                f"two masks for {image}: {binary_mask} and {instance_mask}; keep only one of them in {mask_dir}"
            )
        cases.append(
            GlasCase(
                name=stem,
                part=match.group(1),
                number=int(match.group(2)),
                image=image,
                mask=instance_mask or binary_mask,
                label_type="instance" if instance_mask else "binary" if binary_mask else None,
                mask_folder=os.path.abspath(mask_dir),
            )
        )
    return sorted(cases, key=lambda case: case.sort_key)


def _cases_under(root: str) -> list[GlasCase]:
    """Cases of ``root`` laid out as ``images/`` + ``masks/`` or flat (official release); [] if none."""
    if os.path.isdir(os.path.join(root, "images")):
        cases = _cases_in(os.path.join(root, "images"), os.path.join(root, "masks"))
        if cases:
            return cases
    return _cases_in(root, root)


def find_glas_cases(source: str | os.PathLike) -> tuple[str, list[GlasCase]]:
    """Detect the layout of a GlaS ``source`` folder; return the folder holding the data and its cases, in order.

    The data may sit in ``source`` itself or in exactly one of its sub-folders (as in the official zip). Raises
    :class:`BundleInputError` when ``source`` is missing or holds no GlaS images.
    """
    source = check_source(source, "GlaS")
    cases = _cases_under(source)
    if cases:
        return source, cases
    nested = {}
    for entry in sorted(os.scandir(source), key=lambda entry: entry.name):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in _SKIPPED_FOLDERS:
            found = _cases_under(entry.path)
            if found:
                nested[os.path.abspath(entry.path)] = found
    if len(nested) > 1:
        raise BundleInputError(
            f"GlaS images found in several folders of {source} ({', '.join(sorted(nested))}); pass one as the source"
        )
    if not nested:
        raise BundleInputError(f"no GlaS images found in {source}: {_LAYOUT_HINT}")
    return next(iter(nested.items()))


def _check_case(case: GlasCase, needs_mask: bool) -> None:
    """Raise :class:`BundleInputError` if the image (and, when needed, its mask) cannot be used."""
    image = inspect_image(case.image)
    if image.mode != "RGB":
        raise BundleInputError(f"image {case.image} has {image.mode} pixels; expected an RGB image")
    if not needs_mask:
        return
    if case.mask is None:
        expected = [f"{case.name}{_INSTANCE_SUFFIX}"]
        if case.mask_folder != os.path.dirname(case.image):
            expected.insert(0, case.name)
        looked_for = " or ".join(os.path.join(case.mask_folder, stem) for stem in expected)
        raise BundleInputError(
            f"no mask for image {case.image}: found no {looked_for} (with extension {'/'.join(_EXTENSIONS)})"
        )
    check_mask(case.mask, image, case.label_type, colour="refuse")


def _item(case: GlasCase, labelled: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"image": case.image}
    if labelled:
        item["label"] = case.mask
        if case.label_type == "instance":
            item["instance_label"] = case.mask
        item["label_type"] = case.label_type
    item["name"] = case.name
    item["part"] = case.part
    return item


def build_glas_datalist(source: str | os.PathLike, split: int) -> dict[str, Any]:
    """Find and check the GlaS files in ``source`` and return the datalist of the ``split`` % labelled setting.

    ``split`` is 10 or 20 (the fixed labelled lists of the literature, the rest of ``train`` unlabelled) or 100 (all
    non-validation ``train`` images labelled). Lists: ``training``, ``validation``, ``unlabeled`` (no labels) and
    ``test`` (``testA`` then ``testB``), each in natural order, with absolute paths.
    """
    if split not in GLAS_SPLITS:
        raise BundleInputError(f"GlaS split must be one of {', '.join(map(str, GLAS_SPLITS))}, got {split!r}")
    source = os.path.abspath(os.path.expanduser(os.fspath(source)))
    root, cases = find_glas_cases(source)
    by_name = {case.name: case for case in cases}
    train_names = [case.name for case in cases if case.part == "train"]
    labelled_names = GLAS_LABELLED_NAMES.get(split, ())
    for name in GLAS_VALIDATION_NAMES + labelled_names:
        if name not in by_name:
            role = "validation" if name in GLAS_VALIDATION_NAMES else f"labelled ({split} % split)"
            raise BundleInputError(
                f"GlaS source {source} has no image {name}, needed as a {role} image (looked in {root}: "
                f"{_LAYOUT_HINT})"
            )

    def ordered(names: set[str]) -> list[GlasCase]:
        return sorted((by_name[name] for name in names), key=lambda case: case.sort_key)

    validation = ordered(set(GLAS_VALIDATION_NAMES))
    training = ordered(set(train_names) - set(GLAS_VALIDATION_NAMES) if split == 100 else set(labelled_names))
    unlabeled = ordered(set(train_names) - set(GLAS_VALIDATION_NAMES) - {case.name for case in training})
    test = [case for case in cases if case.part != "train"]

    checks = (
        [(case, True) for case in training + validation]
        + [(case, False) for case in unlabeled]
        + [(case, True) for case in test]
    )
    check_all(lambda check: _check_case(*check), checks)
    return {
        "dataset": "glas",
        "split": split,
        "settings": {"num_classes": len(GLAS_CLASS_NAMES), "class_names": list(GLAS_CLASS_NAMES)},
        "source": source,
        "training": [_item(case, True) for case in training],
        "validation": [_item(case, True) for case in validation],
        "unlabeled": [_item(case, False) for case in unlabeled],
        "test": [_item(case, True) for case in test],
    }


def prepare_glas(
    source: str | os.PathLike, output: str | os.PathLike, split: int, *, force: bool = False
) -> dict[str, Any]:
    """Write ``output/datalist.json`` for GlaS ``source`` and ``split`` (see :func:`build_glas_datalist`).

    Refuses to overwrite an existing datalist unless ``force``, and never overwrites a file inside ``source``.
    Returns the datalist that was written.
    """
    source = check_source(source, "GlaS")
    output = check_output([source], output, "GlaS", force=force)
    datalist = build_glas_datalist(source, split)
    write_prepared(datalist, output)
    return datalist
