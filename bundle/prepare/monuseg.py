"""Preparation of MoNuSeg-style nucleus data: TIFF images with Aperio XML polygons (or mask files) of the same name.

Source layouts (the data may also sit in exactly one sub-folder of ``--source``, as in the official zips)::

    Tissue Images/<name>.tif  +  Annotations/<name>.xml     (MoNuSeg 2018 Training Data)
    <name>.tif  +  <name>.xml  in one folder                  (MoNuSegTestData)
    <images>/<name>.tif  +  Masks/<name>.png                  (mask files instead of XML: instance ids or 0/255)

An Aperio annotation is ``<Annotations><Annotation><Regions><Region><Vertices><Vertex X=".." Y=".."/>...``; each
region is one nucleus. Its polygon is rasterised with ``skimage.draw.polygon`` (pixels whose centre is inside or on
the outline; X is the column, Y the row; a later region overwrites an earlier one where they overlap) into an
instance mask (uint16 PNG, ids 1..N in file order) and a binary mask (0/255 PNG), written as
``OUT/masks/instances/<name>.png`` and ``OUT/masks/binary/<name>.png``. Items get ``"label"`` = the binary mask and
``"instance_label"`` = the instance mask, which evaluation uses for object metrics. Regions with fewer than three
vertices are skipped and reported in a notice; malformed XML is an error naming the file.

Splits: ``--test-source`` (e.g. the MoNuSeg test set) is the test list, otherwise a seeded ``--test-fraction`` of the
annotated images; a seeded ``--val-fraction`` is validation and ``--labeled-percent`` of the rest is labelled.
Images without an annotation can only be unlabelled. Nothing is written into a source.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from skimage.draw import polygon

from bundle.data.datalist import absolute_path
from bundle.errors import BundleInputError
from bundle.prepare.checks import ImageInfo, check_all, check_mask, colour_mode_notice, files_by_stem, inspect_image
from bundle.prepare.output import GeneratedFolders, check_output, check_source, write_prepared
from bundle.prepare.splits import seeded_split, validate_fractions

__all__ = [
    "MONUSEG_CLASS_NAMES",
    "MonusegCase",
    "build_monuseg_datalist",
    "find_monuseg_cases",
    "prepare_monuseg",
    "rasterise_annotation",
    "read_aperio_polygons",
]

logger = logging.getLogger(__name__)

MONUSEG_CLASS_NAMES = ("background", "nucleus")
# what the text prototypes encode (the train config's defaults describe colon glands)
MONUSEG_CLASS_DESCRIPTIONS = (
    "background of an H&E tissue image: cytoplasm, stroma and other tissue between the cell nuclei",
    "cell nucleus in an H&E tissue image: a dark purple, round or oval nucleus",
)
_IMAGE_SUFFIXES = (".tif", ".tiff")
_MASK_SUFFIXES = (".png", ".tif", ".tiff")
_IMAGE_FOLDERS = ("tissue images", "images")
_ANNOTATION_FOLDERS = ("annotations",)
_MASK_FOLDERS = ("masks",)
_MAX_INSTANCES = np.iinfo(np.uint16).max
_LAYOUT_HINT = (
    "expected Tissue Images/<name>.tif with Annotations/<name>.xml, <name>.tif with <name>.xml in one folder, or "
    "<name>.tif with Masks/<name>.png"
)


@dataclass(frozen=True)
class MonusegCase:
    """One image with its annotation (Aperio XML) or mask file, if it has one."""

    name: str
    image: str
    annotation: str | None  # XML file
    mask: str | None  # mask file given instead of XML


def _subfolder(folder: str, names: tuple[str, ...]) -> str | None:
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_dir() and entry.name.lower() in names:
            return os.path.abspath(entry.path)
    return None


def _layout(folder: str) -> tuple[str, str, str | None] | None:
    """(image folder, annotation folder, mask folder) of ``folder`` if it holds MoNuSeg-style images, else None."""
    image_folder = _subfolder(folder, _IMAGE_FOLDERS)
    if image_folder is None:
        if not files_by_stem(folder, _IMAGE_SUFFIXES):
            return None
        image_folder = folder
    elif not files_by_stem(image_folder, _IMAGE_SUFFIXES):
        return None
    annotation_folder = _subfolder(folder, _ANNOTATION_FOLDERS) or image_folder
    return image_folder, annotation_folder, _subfolder(folder, _MASK_FOLDERS)


def find_monuseg_cases(source: str | os.PathLike, label: str = "MoNuSeg") -> list[MonusegCase]:
    """The images of a MoNuSeg-style ``source`` with their annotation or mask file, in name order.

    Raises :class:`BundleInputError` for a missing source, no images, two files with one name, an image with both an
    XML annotation and a mask file, and an annotation or mask without an image.
    """
    source = check_source(source, label)
    layout = _layout(source)
    if layout is None:
        nested = {}
        for entry in sorted(os.scandir(source), key=lambda entry: entry.name):
            if entry.is_dir() and not entry.name.startswith(".") and entry.name != "__MACOSX":
                found = _layout(entry.path)
                if found:
                    nested[os.path.abspath(entry.path)] = found
        if len(nested) > 1:
            raise BundleInputError(
                f"{label} images found in several folders of {source} ({', '.join(sorted(nested))}); "
                "pass one as the source"
            )
        if not nested:
            raise BundleInputError(f"no {label} images (.tif) found in {source}: {_LAYOUT_HINT}")
        layout = next(iter(nested.values()))
    image_folder, annotation_folder, mask_folder = layout
    images = files_by_stem(image_folder, _IMAGE_SUFFIXES)
    annotations = files_by_stem(annotation_folder, (".xml",))
    masks = files_by_stem(mask_folder, _MASK_SUFFIXES) if mask_folder else {}
    for kind, files in (("annotation", annotations), ("mask", masks)):
        for name, path in files.items():
            if name not in images:
                raise BundleInputError(f"{kind} {path} has no image: expected {os.path.join(image_folder, name)}.tif")
    both = sorted(set(annotations) & set(masks))
    if both:
        name = both[0]
        raise BundleInputError(
            f"two annotations for image {images[name]}: {annotations[name]} and {masks[name]}; keep only one"
        )
    return [MonusegCase(name, image, annotations.get(name), masks.get(name)) for name, image in images.items()]


def _coordinate(vertex: ElementTree.Element, axis: str, path: str, region: str) -> float:
    value = vertex.get(axis)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise BundleInputError(
            f"annotation {path}: region {region} has a vertex with {axis}={value!r}; expected a number"
        )
    return number


def read_aperio_polygons(path: str) -> tuple[list[np.ndarray], list[str]]:
    """The polygons of an Aperio XML file as (N, 2) arrays of (row, column) = (Y, X), in file order.

    Also returns the ids of regions skipped for having fewer than three vertices. Raises :class:`BundleInputError`
    for a file that is not XML, not an Aperio ``<Annotations>`` file, or has a vertex without numeric X and Y.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise BundleInputError(f"annotation {path} is not valid XML: {error}") from error
    except OSError as error:
        raise BundleInputError(f"cannot read annotation {path}: {error.strerror or error}") from error
    if root.tag != "Annotations":
        raise BundleInputError(
            f"annotation {path} has a <{root.tag}> root; expected an Aperio <Annotations> file with "
            "<Annotation><Regions><Region><Vertices><Vertex X=.. Y=../>"
        )
    polygons, skipped = [], []
    for index, region in enumerate(root.iter("Region"), start=1):
        region_id = region.get("Id") or str(index)
        vertices = [vertex for vertices in region.iter("Vertices") for vertex in vertices.iter("Vertex")]
        if len(vertices) < 3:
            skipped.append(region_id)
            continue
        polygons.append(
            np.array(
                [
                    [_coordinate(vertex, "Y", path, region_id), _coordinate(vertex, "X", path, region_id)]
                    for vertex in vertices
                ]
            )
        )
    return polygons, skipped


def rasterise_annotation(polygons: list[np.ndarray], size: tuple[int, int], path: str = "") -> np.ndarray:
    """Instance mask (height, width) uint16 of ``polygons`` ((row, column) vertices) for an image of ``size``
    (width, height): polygon ``i`` gets id ``i + 1``, later polygons overwrite earlier ones, outside is 0."""
    if len(polygons) > _MAX_INSTANCES:
        raise BundleInputError(f"annotation {path} has {len(polygons)} regions; at most {_MAX_INSTANCES} fit a mask")
    width, height = size
    instances = np.zeros((height, width), dtype=np.uint16)
    for instance_id, vertices in enumerate(polygons, start=1):
        rows, columns = polygon(vertices[:, 0], vertices[:, 1], shape=(height, width))
        instances[rows, columns] = instance_id
    return instances


@dataclass(frozen=True)
class _Labelled:
    image: ImageInfo
    label: str | None = None
    instance_label: str | None = None
    skipped_regions: tuple[str, ...] = ()


class _CaseWriter:
    """Checks one case and writes the masks of its XML annotation (if it has one)."""

    def __init__(self, folders: GeneratedFolders) -> None:
        self.folders = folders

    def __call__(self, case: MonusegCase) -> _Labelled:
        image = inspect_image(case.image)
        if case.mask is not None:
            values = set(np.unique(check_mask(case.mask, image, "instance")).tolist())
            binary = values <= {0, 1} or values <= {0, 255}
            return _Labelled(image, case.mask, None if binary else case.mask)
        if case.annotation is None:
            return _Labelled(image)
        polygons, skipped = read_aperio_polygons(case.annotation)
        instances = rasterise_annotation(polygons, image.size, case.annotation)
        paths = {}
        for kind, pixels in (("instances", instances), ("binary", np.where(instances > 0, 255, 0).astype(np.uint8))):
            relative = os.path.join(kind, f"{case.name}.png")
            staged = os.path.join(self.folders.staging("masks"), relative)
            os.makedirs(os.path.dirname(staged), exist_ok=True)
            Image.fromarray(pixels).save(staged)
            paths[kind] = os.path.join(self.folders.final("masks"), relative)
        return _Labelled(
            image, paths["binary"], paths["instances"], tuple(f"{case.annotation} region {r}" for r in skipped)
        )


def _item(case: MonusegCase, labelled: _Labelled, with_label: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"image": case.image}
    if with_label:
        item["label"] = labelled.label
        if labelled.instance_label:
            item["instance_label"] = labelled.instance_label
    item["name"] = case.name
    return item


def build_monuseg_datalist(
    source: str | os.PathLike,
    folders: GeneratedFolders,
    *,
    labeled_percent: float,
    test_source: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Find and check the images of ``source`` (and ``test_source``), write their masks into ``folders`` (an
    entered :class:`GeneratedFolders` for ``masks``) and return the datalist.

    ``test_fraction`` defaults to 0.2 without ``test_source`` and must be 0 (or unset) with it.
    """
    if test_source is not None and test_fraction:
        raise BundleInputError("pass either --test-source or --test-fraction, not both")
    test_fraction = (0.0 if test_source is not None else 0.2) if test_fraction is None else test_fraction
    validate_fractions(labeled_percent, val_fraction, test_fraction)
    cases = find_monuseg_cases(source)
    test_cases = find_monuseg_cases(test_source, "MoNuSeg test") if test_source is not None else []
    seen = {case.name: case.image for case in cases}
    for case in test_cases:
        if case.name in seen:
            raise BundleInputError(f"two images named {case.name}: {seen[case.name]} and {case.image}; keep only one")
        if case.annotation is None and case.mask is None:
            raise BundleInputError(
                f"test image {case.image} has no annotation: expected {case.name}.xml (or a mask file) next to it"
            )
    by_name = {case.name: case for case in cases}
    split = seeded_split(
        by_name,
        labeled_percent=labeled_percent,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        with_mask={case.name for case in cases if case.annotation or case.mask},
        what="MoNuSeg images",
    )
    results = dict(zip([case.name for case in cases + test_cases], check_all(_CaseWriter(folders), cases + test_cases)))
    notice = colour_mode_notice(result.image for result in results.values())
    if notice:
        logger.warning(notice)
    skipped = [region for result in results.values() for region in result.skipped_regions]
    if skipped:
        logger.warning(
            "%d annotation regions with fewer than 3 vertices were skipped: %s%s",
            len(skipped),
            ", ".join(skipped[:3]),
            f" and {len(skipped) - 3} more" if len(skipped) > 3 else "",
        )

    def items(names: list[str], with_label: bool) -> list[dict[str, Any]]:
        return [_item(by_name[name], results[name], with_label) for name in names]

    return {
        "dataset": "monuseg",
        "labeled_percent": labeled_percent,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "settings": {
            "num_classes": len(MONUSEG_CLASS_NAMES),
            "class_names": list(MONUSEG_CLASS_NAMES),
            "class_descriptions": list(MONUSEG_CLASS_DESCRIPTIONS),
            "min_object_area": 30,  # nuclei are a few hundred pixels at 40x: only specks are removed
        },
        "source": check_source(source, "MoNuSeg"),
        "test_source": None if test_source is None else check_source(test_source, "MoNuSeg test"),
        "training": items(split.labelled, True),
        "validation": items(split.validation, True),
        "unlabeled": items(split.unlabeled, False),
        "test": items(split.test, True) + [_item(case, results[case.name], True) for case in test_cases],
    }


def prepare_monuseg(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    labeled_percent: float,
    test_source: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write the masks and ``output/datalist.json`` of a MoNuSeg-style ``source`` (see the module docstring)."""
    sources = [check_source(source, "MoNuSeg")]
    if test_source is not None:
        sources.append(check_source(test_source, "MoNuSeg test"))
    output = check_output(sources, absolute_path(output), "MoNuSeg", force=force, writes_files=True)
    with GeneratedFolders(output, ("masks",)) as folders:
        datalist = build_monuseg_datalist(
            sources[0],
            folders,
            labeled_percent=labeled_percent,
            test_source=test_source,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    write_prepared(datalist, output)
    return datalist
