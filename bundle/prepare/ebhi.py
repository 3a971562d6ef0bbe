"""Preparation of EBHI-Seg (Shi et al. 2023, colorectal biopsies, 224x224 H&E) for MPAMatch's two EBHI tasks.

Source layout (``--source`` is the folder holding the class folders, or one level above it, e.g. ``EBHI-SEG/``)::

    <root>/<class>/image/<name>.png    RGB image
    <root>/<class>/label/<name>.png    grey label: 0 background, 255 foreground, anti-aliased edge values between

with the classes ``Normal``, ``Polyp``, ``Low-grade IN``, ``High-grade IN``, ``Serrated adenoma`` and
``Adenocarcinoma``. Two tasks, as EBHI-SEG-GLAND and EBHI-SEG-CANCER in the MPAMatch paper:

- ``gland``: the five non-invasive classes, whose labels outline the glands (from normal mucosa through polyps,
  serrated adenoma and low- to high-grade intraepithelial neoplasia the glands keep their shape);
- ``cancer``: ``Adenocarcinoma`` only, whose labels mark the tumour (adenocarcinoma) regions.

High-grade IN belongs to the gland task: it is a non-invasive (intraepithelial) lesion labelled like the other
gland classes, and putting it with adenocarcinoma would mix two meanings of "foreground" in one task.

Labels are binarised at load time (foreground > 127) by the bundle's ``MaskToClassd(mode="threshold")``: the
``dataset.json`` written next to the datalist sets ``mask_mode`` and the task's classes. Images without a label can
only be unlabelled. Per class (stratified), a seeded
``--val-fraction`` and ``--test-fraction`` of the labelled images go to validation and test, and
``--labeled-percent`` of the remaining labelled images are the labelled training set; every item carries
``"part"`` = its class folder, so evaluation reports per class. Nothing is written into the source.
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
    ImageInfo,
    check_all,
    check_mask,
    colour_mode_notice,
    files_by_stem,
    inspect_image,
)
from bundle.prepare.output import check_output, check_source, write_prepared
from bundle.prepare.splits import seeded_split, validate_fractions

__all__ = [
    "EBHI_CLASSES",
    "EBHI_MASK_THRESHOLD",
    "EBHI_TASKS",
    "EbhiCase",
    "EbhiTask",
    "build_ebhi_datalist",
    "find_ebhi_cases",
    "prepare_ebhi",
]

logger = logging.getLogger(__name__)

EBHI_CLASSES = ("Normal", "Polyp", "Low-grade IN", "High-grade IN", "Serrated adenoma", "Adenocarcinoma")
EBHI_MASK_THRESHOLD = 127
_IMAGE_FOLDER, _LABEL_FOLDER = "image", "label"


@dataclass(frozen=True)
class EbhiTask:
    """One segmentation task: the class folders it uses, the names of its two output classes and, where the train
    config's colon-gland descriptions do not fit, what the text prototypes should encode."""

    name: str
    classes: tuple[str, ...]
    class_names: tuple[str, str]
    class_descriptions: tuple[str, str] | None = None


EBHI_TASKS = {
    "gland": EbhiTask("gland", EBHI_CLASSES[:5], ("background", "gland")),
    "cancer": EbhiTask(
        "cancer",
        ("Adenocarcinoma",),
        ("background", "adenocarcinoma"),
        (
            "background of a colon histology image: stroma, lumen and other tissue outside the tumour",
            "adenocarcinoma in a colon histology image: malignant glands with crowded, irregular, atypical epithelium",
        ),
    ),
}


@dataclass(frozen=True)
class EbhiCase:
    """One EBHI-Seg image with its label, if there is one."""

    part: str  # class folder name, e.g. "Low-grade IN"
    name: str  # file stem
    image: str  # absolute path
    label: str | None  # absolute path, None when the class has no label of that name

    @property
    def key(self) -> str:
        return f"{self.part}/{self.name}"


def _class_folders(folder: str) -> dict[str, str]:
    """EBHI class name -> sub-folder of ``folder`` that holds an ``image`` folder (names compared without case), in
    the order of :data:`EBHI_CLASSES`."""
    wanted = {name.lower(): name for name in EBHI_CLASSES}
    found = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return found
    for entry in entries:
        name = wanted.get(entry.name.lower())
        if name and entry.is_dir() and os.path.isdir(os.path.join(entry.path, _IMAGE_FOLDER)):
            found[name] = os.path.abspath(entry.path)
    return {name: found[name] for name in EBHI_CLASSES if name in found}


def _find_root(source: str) -> tuple[str, dict[str, str]]:
    folders = _class_folders(source)
    if folders:
        return source, folders
    nested = {}
    for entry in sorted(os.scandir(source), key=lambda entry: entry.name):
        if entry.is_dir() and not entry.name.startswith("."):
            found = _class_folders(entry.path)
            if found:
                nested[os.path.abspath(entry.path)] = found
    if len(nested) > 1:
        raise BundleInputError(
            f"EBHI-Seg class folders found in several folders of {source} ({', '.join(sorted(nested))}); "
            "pass one as the source"
        )
    if not nested:
        raise BundleInputError(
            f"no EBHI-Seg class folders found in {source}: expected <class>/image/*.png and <class>/label/*.png with "
            f"<class> one of {', '.join(EBHI_CLASSES)}, in the source or one folder below it"
        )
    return next(iter(nested.items()))


def find_ebhi_cases(source: str | os.PathLike, task: EbhiTask) -> tuple[str, list[EbhiCase]]:
    """The folder holding the class folders and the cases of ``task``'s classes (class order, then name order).

    Raises :class:`BundleInputError` for a missing source or class folder, two images (or labels) with one name,
    and a label without an image.
    """
    source = check_source(source, "EBHI-Seg")
    root, folders = _find_root(source)
    cases = []
    for part in task.classes:
        if part not in folders:
            raise BundleInputError(
                f"EBHI-Seg source {root} has no {part!r} folder with image/ and label/ inside, needed by the "
                f"{task.name} task (found: {', '.join(folders) or 'none'})"
            )
        image_folder = os.path.join(folders[part], _IMAGE_FOLDER)
        label_folder = os.path.join(folders[part], _LABEL_FOLDER)
        if not os.path.isdir(label_folder):
            raise BundleInputError(f"EBHI-Seg class folder {folders[part]} has no {_LABEL_FOLDER}/ folder")
        images = files_by_stem(image_folder, IMAGE_SUFFIXES)
        labels = files_by_stem(label_folder, IMAGE_SUFFIXES)
        for name, label in labels.items():
            if name not in images:
                raise BundleInputError(
                    f"label {label} has no image: expected {os.path.join(image_folder, name)} with the same name"
                )
        cases += [EbhiCase(part, name, image, labels.get(name)) for name, image in images.items()]
    return root, cases


def _check_case(case: EbhiCase) -> ImageInfo:
    image = inspect_image(case.image)
    if case.label is not None:
        check_mask(case.label, image, "grey", threshold=EBHI_MASK_THRESHOLD)
    return image


def _item(case: EbhiCase, labelled: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"image": case.image}
    if labelled:
        item["label"] = case.label
    item["name"] = case.name
    item["part"] = case.part
    return item


def build_ebhi_datalist(
    source: str | os.PathLike,
    task: str,
    *,
    labeled_percent: float,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Find and check the EBHI-Seg files of ``task`` (``"gland"`` or ``"cancer"``) and return its datalist."""
    if task not in EBHI_TASKS:
        raise BundleInputError(f"EBHI-Seg task must be one of {', '.join(EBHI_TASKS)}, got {task!r}")
    validate_fractions(labeled_percent, val_fraction, test_fraction)
    root, cases = find_ebhi_cases(source, EBHI_TASKS[task])
    by_key = {case.key: case for case in cases}
    split = seeded_split(
        by_key,
        labeled_percent=labeled_percent,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        with_mask={case.key for case in cases if case.label is not None},
        strata={case.key: case.part for case in cases},
        what=f"EBHI-Seg {task} images",
    )
    images = check_all(_check_case, cases)
    notice = colour_mode_notice(images)
    if notice:
        logger.warning(notice)

    def items(keys: list[str], labelled: bool) -> list[dict[str, Any]]:
        ordered = sorted(keys, key=lambda key: (EBHI_CLASSES.index(by_key[key].part), by_key[key].name))
        return [_item(by_key[key], labelled) for key in ordered]

    task_info = EBHI_TASKS[task]
    return {
        "dataset": f"ebhi-{task}",
        "classes": list(task_info.classes),
        "labeled_percent": labeled_percent,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "settings": {
            "num_classes": len(task_info.class_names),
            "class_names": list(task_info.class_names),
            **({"class_descriptions": list(task_info.class_descriptions)} if task_info.class_descriptions else {}),
            # the labels are grey with anti-aliased edges: binarised when loaded
            "mask_mode": "threshold",
            "mask_threshold": EBHI_MASK_THRESHOLD,
            # 224 px images: the clean-up removes specks only, not small glands cut by the image border
            "min_object_area": 100,
        },
        "source": root,
        **split.datalist_lists(items),
    }


def prepare_ebhi(
    source: str | os.PathLike,
    output: str | os.PathLike,
    task: str,
    *,
    labeled_percent: float,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``output/datalist.json`` for the EBHI-Seg ``task`` (see :func:`build_ebhi_datalist`); return it."""
    source = check_source(source, "EBHI-Seg")
    output = check_output([source], absolute_path(output), "EBHI-Seg", force=force)
    datalist = build_ebhi_datalist(
        source,
        task,
        labeled_percent=labeled_percent,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    write_prepared(datalist, output)
    return datalist
