"""Preparation of the KPIs 2024 patch-level data (glomeruli in PAS-stained mouse kidney, 2048x2048 patches).

Source layout (``--source`` holds the split folders at any depth up to four, e.g. ``KPIs24 Training Data/
Task1_patch_level/train`` and ``KPIs24 Validation Data/Task1_patch_level/validation`` side by side)::

    <split>/<disease>/<slide>/img/<patch>_img.jpg
    <split>/<disease>/<slide>/mask/<patch>_mask.jpg

with ``<split>`` one of ``train``, ``validation``, ``test`` and ``<disease>`` one of ``56Nx``, ``DN``, ``NEP25``,
``normal``. Masks are JPEG, so their edges and flat areas carry compression noise; they are binarised here
(luma > 127) and written as 0/255 PNG, so KPI datalists need no load-time threshold.

Training patches are cut into ``--tile-size`` tiles (default 512; the last row and column of tiles are shifted
back to end at the border, so every tile has the full size and together they cover the patch) written as PNG with
their binarised masks under ``OUT/tiles/``. ``--labeled-percent`` of the training patches with a mask (per
disease, seeded) give labelled tiles, all other training patches unlabelled tiles. Validation and test keep the full
patches from the source (the bundle validates with a sliding window) with binarised masks under ``OUT/masks/``.
Without a ``validation`` (or ``test``) folder, a seeded ``--val-fraction`` (``--test-fraction``) of the training
slides is used instead, whole slides at a time so that no slide is in two lists. Items carry ``"part"`` = disease.
Every file is checked first; tiles and masks are staged and moved into place only when everything succeeded, and
nothing is written into the source.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bundle.data.datalist import absolute_path
from bundle.errors import BundleInputError
from bundle.prepare.checks import ImageInfo, check_all, check_mask, colour_mode_notice, files_by_stem, read_image
from bundle.prepare.output import GeneratedFolders, check_output, check_source, write_prepared
from bundle.prepare.splits import seeded_split, validate_fractions

__all__ = [
    "KPI_DISEASES",
    "KPI_MASK_THRESHOLD",
    "KPI_SPLITS",
    "KpiPatch",
    "build_kpi_datalist",
    "find_kpi_patches",
    "prepare_kpi",
    "tile_origins",
]

logger = logging.getLogger(__name__)

KPI_SPLITS = ("train", "validation", "test")
KPI_DISEASES = ("56Nx", "DN", "NEP25", "normal")
KPI_MASK_THRESHOLD = 127
KPI_CLASS_NAMES = ("background", "glomerulus")
# what the text prototypes encode (the train config's defaults describe colon glands)
KPI_CLASS_DESCRIPTIONS = (
    "background of a kidney histology image: tubules, interstitium, vessels and other non-glomerular tissue",
    "glomerulus in a kidney histology image: a round tuft of capillaries inside Bowman's capsule",
)
_SUFFIXES = (".jpg", ".jpeg", ".png")
_IMAGE_FOLDER, _MASK_FOLDER = "img", "mask"
_IMAGE_SUFFIX, _MASK_SUFFIX = "_img", "_mask"
_SEARCH_DEPTH = 4
_MIN_TILE_SIZE = 16
# modes whose pixels are written to PNG tiles as they are (others become RGB, or RGBA with transparency)
_TILE_MODES = ("1", "L", "LA", "RGB", "RGBA", "I;16")
_LAYOUT_HINT = (
    "expected <split>/<disease>/<slide>/img/<patch>_img.jpg with <split>/<disease>/<slide>/mask/<patch>_mask.jpg, "
    f"<split> one of {', '.join(KPI_SPLITS)} and <disease> one of {', '.join(KPI_DISEASES)}"
)


@dataclass(frozen=True)
class KpiPatch:
    """One KPI patch with its mask, if there is one."""

    split: str  # the source folder it came from: "train", "validation" or "test"
    disease: str
    slide: str
    name: str  # file stem without "_img"
    image: str  # absolute path
    mask: str | None  # absolute path

    @property
    def key(self) -> str:
        return f"{self.disease}/{self.slide}/{self.name}"

    @property
    def slide_key(self) -> str:
        return f"{self.disease}/{self.slide}"


def tile_origins(length: int, tile_size: int) -> list[int]:
    """Start offsets of full-size tiles covering ``length`` pixels: 0, t, 2t, ... and a last one ending at the border.

    ``tile_origins(2048, 512) == [0, 512, 1024, 1536]``, ``tile_origins(600, 256) == [0, 256, 344]``; a side shorter
    than the tile gives one tile of that side (``[0]``).
    """
    if length <= tile_size:
        return [0]
    return list(range(0, length - tile_size, tile_size)) + [length - tile_size]


def _disease_folders(folder: str) -> dict[str, str]:
    wanted = {name.lower(): name for name in KPI_DISEASES}
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.is_dir() and entry.name.lower() in wanted:
            found[wanted[entry.name.lower()]] = os.path.abspath(entry.path)
    return found


def _find_split_folders(source: str) -> dict[str, str]:
    """Split name -> folder: folders named like a split that hold disease folders, at most four levels down."""
    found: dict[str, str] = {}
    for folder, subfolders, _ in os.walk(source):
        depth = os.path.relpath(folder, source).count(os.sep) + (folder != source)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".") and name != "__MACOSX")
        if depth >= _SEARCH_DEPTH:
            subfolders[:] = []
        split = os.path.basename(folder).lower()
        if split in KPI_SPLITS and _disease_folders(folder):
            if split in found:
                raise BundleInputError(
                    f"two KPI {split} folders in {source}: {found[split]} and {os.path.abspath(folder)}; "
                    "keep only one"
                )
            found[split] = os.path.abspath(folder)
            subfolders[:] = []
    return found


def _patches_of_slide(split: str, disease: str, slide_folder: str) -> list[KpiPatch]:
    slide = os.path.basename(slide_folder)
    image_folder = os.path.join(slide_folder, _IMAGE_FOLDER)
    mask_folder = os.path.join(slide_folder, _MASK_FOLDER)
    images = files_by_stem(image_folder, _SUFFIXES, keep=lambda stem: stem.endswith(_IMAGE_SUFFIX), missing_ok=True)
    masks = files_by_stem(mask_folder, _SUFFIXES, keep=lambda stem: stem.endswith(_MASK_SUFFIX), missing_ok=True)
    images = {stem.removesuffix(_IMAGE_SUFFIX): path for stem, path in images.items()}
    masks = {stem.removesuffix(_MASK_SUFFIX): path for stem, path in masks.items()}
    for name, mask in masks.items():
        if name not in images:
            raise BundleInputError(
                f"mask {mask} has no image: expected {os.path.join(image_folder, name + _IMAGE_SUFFIX)}.jpg"
            )
    return [KpiPatch(split, disease, slide, name, image, masks.get(name)) for name, image in images.items()]


def find_kpi_patches(source: str | os.PathLike) -> dict[str, list[KpiPatch]]:
    """The patches of each split folder found in ``source`` (``train`` is required), in disease/slide/name order."""
    source = check_source(source, "KPI")
    folders = _find_split_folders(source)
    if "train" not in folders:
        raise BundleInputError(
            f"no KPI train folder found in {source} (searched {_SEARCH_DEPTH} levels): {_LAYOUT_HINT}"
        )
    patches: dict[str, list[KpiPatch]] = {}
    for split, split_folder in folders.items():
        found = []
        for disease, disease_folder in _disease_folders(split_folder).items():
            for entry in sorted(os.scandir(disease_folder), key=lambda entry: entry.name):
                if entry.is_dir() and not entry.name.startswith("."):
                    found += _patches_of_slide(split, disease, entry.path)
        if not found:
            raise BundleInputError(f"KPI {split} folder {split_folder} holds no patch images: {_LAYOUT_HINT}")
        patches[split] = found
    seen: dict[str, str] = {}
    for patch in (patch for found in patches.values() for patch in found):
        if patch.key in seen:
            raise BundleInputError(
                f"patch {patch.name} of slide {patch.slide} is in two splits: {seen[patch.key]} and {patch.image}; "
                "keep only one"
            )
        seen[patch.key] = patch.image
    return patches


def _binarise(mask: np.ndarray) -> np.ndarray:
    return np.where(mask > KPI_MASK_THRESHOLD, 255, 0).astype(np.uint8)


def _relative_tile(patch: KpiPatch, y: int, x: int) -> str:
    return os.path.join(patch.disease, patch.slide, f"{patch.name}_y{y}_x{x}.png")


def _as_rgb(path: str, image: ImageInfo) -> np.ndarray:
    """Pixels of an image whose mode has no PNG equivalent (palette, CMYK, ...) as RGB, or RGBA if transparent."""
    with Image.open(path) as opened:
        transparent = "transparency" in image.mode or "A" in opened.mode
        return np.asarray(opened.convert("RGBA" if transparent else "RGB"))


def _save_png(pixels: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


class _PatchWriter:
    """Checks one patch and writes what the datalist needs of it: tiles (training) or a binarised mask."""

    def __init__(self, folders: GeneratedFolders, tile_size: int, tiled: set[str], labelled: set[str]) -> None:
        self.folders = folders
        self.tile_size = tile_size
        self.tiled = tiled
        self.labelled = labelled

    def __call__(self, patch: KpiPatch) -> tuple[ImageInfo, list[dict[str, Any]]]:
        image, pixels = read_image(patch.image)
        if patch.key in self.tiled and image.mode not in _TILE_MODES:
            pixels = _as_rgb(patch.image, image)
        mask = None
        if patch.mask is not None:
            mask = _binarise(check_mask(patch.mask, image, "grey", threshold=KPI_MASK_THRESHOLD, colour="luma"))
        if patch.key not in self.tiled:
            if mask is None:
                raise BundleInputError(
                    f"no mask for {patch.split} image {patch.image}: expected "
                    f"{os.path.join(os.path.dirname(os.path.dirname(patch.image)), _MASK_FOLDER, patch.name)}"
                    f"{_MASK_SUFFIX}.jpg"
                )
            relative = os.path.join(patch.split, patch.disease, patch.slide, f"{patch.name}.png")
            _save_png(mask, os.path.join(self.folders.staging("masks"), relative))
            item = {"image": patch.image, "label": os.path.join(self.folders.final("masks"), relative)}
            return image, [{**item, "name": patch.name, "part": patch.disease}]
        labelled = patch.key in self.labelled
        items = []
        height, width = pixels.shape[:2]
        for y in tile_origins(height, self.tile_size):
            for x in tile_origins(width, self.tile_size):
                window = np.s_[y : y + self.tile_size, x : x + self.tile_size]
                relative = _relative_tile(patch, y, x)
                _save_png(pixels[window], os.path.join(self.folders.staging("tiles"), "images", relative))
                item = {"image": os.path.join(self.folders.final("tiles"), "images", relative)}
                if labelled:
                    _save_png(mask[window], os.path.join(self.folders.staging("tiles"), "masks", relative))
                    item["label"] = os.path.join(self.folders.final("tiles"), "masks", relative)
                items.append({**item, "name": f"{patch.name}_y{y}_x{x}", "part": patch.disease})
        return image, items


def _held_out_slides(
    train: list[KpiPatch], val_fraction: float, test_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """Whole training slides (per disease, seeded) for validation and test when the source has no folder for them.

    Only slides with a mask for every patch qualify; a fraction of 0 gives no slides.
    """
    slides = {patch.slide_key: patch.disease for patch in train}
    fully_masked = set(slides) - {patch.slide_key for patch in train if patch.mask is None}
    split = seeded_split(
        slides,
        labeled_percent=100,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        with_mask=fully_masked,
        strata=slides,
        what="KPI training slides (whole slides are held out when there is no validation or test folder)",
    )
    return set(split.validation), set(split.test)


def _flatten(item_lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [item for items in item_lists for item in items]


def build_kpi_datalist(
    source: str | os.PathLike,
    folders: GeneratedFolders,
    *,
    labeled_percent: float,
    tile_size: int = 512,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Find and check the KPI patches of ``source``, write tiles and masks into ``folders`` and return the datalist.

    ``folders`` must be an entered :class:`GeneratedFolders` for ``tiles`` and ``masks``. ``val_fraction`` and
    ``test_fraction`` are used only when the source has no ``validation`` or ``test`` folder.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < _MIN_TILE_SIZE:
        raise BundleInputError(
            f"--tile-size must be a whole number of pixels, at least {_MIN_TILE_SIZE}, got {tile_size!r}"
        )
    validate_fractions(labeled_percent, val_fraction, test_fraction)
    source = check_source(source, "KPI")
    found = find_kpi_patches(source)
    train = found["train"]
    val_fraction = 0.0 if "validation" in found else val_fraction
    test_fraction = 0.0 if "test" in found else test_fraction
    if "validation" not in found and val_fraction == 0:
        raise BundleInputError(f"no KPI validation folder in {source} and --val-fraction is 0: nothing to validate on")
    validation, test = found.get("validation", []), found.get("test", [])
    if val_fraction or test_fraction:
        validation_slides, test_slides = _held_out_slides(train, val_fraction, test_fraction, seed)
        validation = validation or [patch for patch in train if patch.slide_key in validation_slides]
        test = test or [patch for patch in train if patch.slide_key in test_slides]
        train = [patch for patch in train if patch.slide_key not in validation_slides | test_slides]
    if not test:
        logger.warning("no KPI test folder in %s and --test-fraction is 0: the test list is empty", source)
    split = seeded_split(
        [patch.key for patch in train],
        labeled_percent=labeled_percent,
        seed=seed,
        with_mask={patch.key for patch in train if patch.mask is not None},
        strata={patch.key: patch.disease for patch in train},
        what="KPI training patches",
    )
    labelled = set(split.labelled)
    train = [patch for patch in train if patch.key in labelled] + [
        patch for patch in train if patch.key not in labelled
    ]
    writer = _PatchWriter(folders, tile_size, {patch.key for patch in train}, labelled)
    results = check_all(writer, train + validation + test)
    notice = colour_mode_notice(image for image, _ in results)
    if notice:
        logger.warning(notice)
    item_lists = [items for _, items in results]
    ends = np.cumsum([len(labelled), len(train) - len(labelled), len(validation), len(test)])
    return {
        "dataset": "kpi",
        "labeled_percent": labeled_percent,
        "tile_size": tile_size,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "settings": {
            "num_classes": len(KPI_CLASS_NAMES),
            "class_names": list(KPI_CLASS_NAMES),
            "class_descriptions": list(KPI_CLASS_DESCRIPTIONS),
            "min_object_area": 500,  # glomeruli are thousands of pixels; a glomerulus cut by a tile edge is kept
        },
        "source": source,
        "training": _flatten(item_lists[: ends[0]]),
        "validation": _flatten(item_lists[ends[1] : ends[2]]),
        "unlabeled": _flatten(item_lists[ends[0] : ends[1]]),
        "test": _flatten(item_lists[ends[2] : ends[3]]),
    }


def prepare_kpi(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    labeled_percent: float,
    tile_size: int = 512,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write the tiles, masks and ``output/datalist.json`` of KPI ``source`` (see the module docstring)."""
    source = check_source(source, "KPI")
    output = check_output([source], absolute_path(output), "KPI", force=force, writes_files=True)
    with GeneratedFolders(output, ("tiles", "masks")) as folders:
        datalist = build_kpi_datalist(
            source,
            folders,
            labeled_percent=labeled_percent,
            tile_size=tile_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    write_prepared(datalist, output)
    return datalist
