"""Preparation of any dataset laid out as a folder of images and a folder of masks matched by name.

``--images DIR`` holds the images (PNG, JPEG, BMP, TIFF) and ``--masks DIR`` the masks: the mask of ``<name>.<ext>``
is ``<name><suffix>.<ext2>`` (``--mask-suffix``, default none: the same stem). The two may be one folder when the
suffix is not empty. Images without a mask become unlabelled, and so do all images of ``--unlabeled DIR``; a mask
without an image, two files with one name, and a name found in both image folders are errors naming the files.

``--mask-type`` says what the masks hold: ``binary`` (0/255 or 0/1, the default), ``instance`` (integer object ids, also
given to evaluation as ``"instance_label"``) or ``grey`` (8-bit with soft edges, binarised at load time, foreground >
127: the ``dataset.json`` written next to the datalist sets ``mask_mode``). A seeded ``--val-fraction`` and
``--test-fraction`` of the images with a mask go to validation and test, and ``--labeled-percent`` (default 100) of the
remaining images with a mask are labelled. Only the datalist and ``dataset.json`` are written, never anything in the
source folders.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from bundle.data.datalist import absolute_path
from bundle.errors import BundleInputError
from bundle.prepare.checks import (
    IMAGE_SUFFIXES,
    MASK_KINDS,
    ImageInfo,
    check_all,
    check_mask,
    colour_mode_notice,
    files_by_stem,
    inspect_image,
)
from bundle.prepare.output import check_output, check_source, write_prepared
from bundle.prepare.splits import seeded_split, validate_fractions

__all__ = ["FolderCase", "build_folders_datalist", "find_folder_cases", "prepare_folders"]

logger = logging.getLogger(__name__)

_GREY_THRESHOLD = 127


@dataclass(frozen=True)
class FolderCase:
    """One image with its mask, if it has one."""

    name: str
    image: str
    mask: str | None


def find_folder_cases(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    *,
    mask_suffix: str = "",
    unlabeled: str | os.PathLike | None = None,
) -> list[FolderCase]:
    """Match the images of ``images`` with the masks of ``masks``; add the images of ``unlabeled`` without masks.

    Returns the cases in name order. Raises :class:`BundleInputError` for missing folders, no images, two files
    with one name, a name in both image folders, and a mask without an image.
    """
    image_folder = check_source(images, "images")
    mask_folder = check_source(masks, "masks")
    same_folder = os.path.realpath(image_folder) == os.path.realpath(mask_folder)
    if same_folder and not mask_suffix:
        raise BundleInputError(
            f"--images and --masks are the same folder {image_folder}; give the masks' --mask-suffix (e.g. _mask)"
        )
    is_mask = (lambda stem: stem.endswith(mask_suffix)) if same_folder else None
    image_files = files_by_stem(
        image_folder, IMAGE_SUFFIXES, keep=None if is_mask is None else lambda s: not is_mask(s)
    )
    mask_files = files_by_stem(mask_folder, IMAGE_SUFFIXES, keep=is_mask)
    extra_files = files_by_stem(check_source(unlabeled, "unlabeled images"), IMAGE_SUFFIXES) if unlabeled else {}
    if not image_files:
        raise BundleInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_folder}")
    for name, path in extra_files.items():
        if name in image_files:
            raise BundleInputError(f"two images named {name}: {image_files[name]} and {path}; keep only one")
    masks_by_image = {}
    for stem, path in mask_files.items():
        if mask_suffix and not stem.endswith(mask_suffix):
            raise BundleInputError(f"mask {path} does not end with the mask suffix {mask_suffix!r}")
        name = stem[: len(stem) - len(mask_suffix)]
        if name not in image_files:
            raise BundleInputError(
                f"mask {path} has no image: expected {os.path.join(image_folder, name)}.<png|jpg|tif>"
            )
        masks_by_image[name] = path
    cases = [FolderCase(name, path, masks_by_image.get(name)) for name, path in image_files.items()]
    cases += [FolderCase(name, path, None) for name, path in extra_files.items()]
    return sorted(cases, key=lambda case: case.name)


def build_folders_datalist(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    *,
    mask_suffix: str = "",
    unlabeled: str | os.PathLike | None = None,
    mask_type: str = "binary",
    labeled_percent: float = 100,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Find and check the images and masks and return the datalist (see the module docstring)."""
    if mask_type not in MASK_KINDS:
        raise BundleInputError(f"--mask-type must be one of {', '.join(MASK_KINDS)}, got {mask_type!r}")
    validate_fractions(labeled_percent, val_fraction, test_fraction)
    cases = find_folder_cases(images, masks, mask_suffix=mask_suffix, unlabeled=unlabeled)
    by_name = {case.name: case for case in cases}
    split = seeded_split(
        by_name,
        labeled_percent=labeled_percent,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        with_mask={case.name for case in cases if case.mask is not None},
    )

    def check(case: FolderCase) -> ImageInfo:
        image = inspect_image(case.image)
        if case.mask is not None:
            check_mask(case.mask, image, mask_type, threshold=_GREY_THRESHOLD)
        return image

    notice = colour_mode_notice(check_all(check, cases))
    if notice:
        logger.warning(notice)

    def items(names: list[str], labelled: bool) -> list[dict[str, Any]]:
        result = []
        for name in names:
            case = by_name[name]
            item: dict[str, Any] = {"image": case.image}
            if labelled:
                item["label"] = case.mask
                if mask_type == "instance":
                    item["instance_label"] = case.mask
            item["name"] = name
            result.append(item)
        return result

    return {
        "dataset": "folders",
        "mask_type": mask_type,
        "labeled_percent": labeled_percent,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        # grey masks (soft edges) are binarised when loaded; objects of unknown size: no clean-up unless asked for
        "settings": {
            **({"mask_mode": "threshold", "mask_threshold": _GREY_THRESHOLD} if mask_type == "grey" else {}),
            "min_object_area": 0,
            "fill_holes": False,
        },
        "images": check_source(images, "images"),
        "masks": check_source(masks, "masks"),
        **split.datalist_lists(items),
    }


def prepare_folders(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    output: str | os.PathLike,
    *,
    mask_suffix: str = "",
    unlabeled: str | os.PathLike | None = None,
    mask_type: str = "binary",
    labeled_percent: float = 100,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``output/datalist.json`` for an images folder and a masks folder; return the datalist."""
    sources = [check_source(images, "images"), check_source(masks, "masks")]
    if unlabeled is not None:
        sources.append(check_source(unlabeled, "unlabeled images"))
    output = check_output(sources, absolute_path(output), "input", force=force)
    datalist = build_folders_datalist(
        images,
        masks,
        mask_suffix=mask_suffix,
        unlabeled=unlabeled,
        mask_type=mask_type,
        labeled_percent=labeled_percent,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    write_prepared(datalist, output)
    return datalist
