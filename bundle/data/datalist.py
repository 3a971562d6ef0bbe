"""Loading and validating the bundle's datalists (``<dataset_dir>/datalist.json``, MONAI JSON style).

A datalist holds the lists ``training`` (labelled: ``{"image", "label", ...}``), ``unlabeled`` (``{"image", ...}``),
``validation`` and ``test`` (labelled). Items may carry extra keys (``name``, ``part``, ``instance_label``, ...);
paths are relative to the dataset folder or absolute. Every problem is reported as a one-line
:class:`~bundle.errors.BundleInputError` that names the datalist file, the list, the item and the path.
Given :class:`~bundle.data.checks.DatalistChecks` (the configs pass ``@datalist_checks``), a loaded list also gets
the checks prepared data gets (:mod:`bundle.data.checks`), once, when it is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bundle.errors import BundleInputError

if TYPE_CHECKING:
    from bundle.data.checks import DatalistChecks

__all__ = [
    "DATALIST_FILENAME",
    "LABELLED_KEYS",
    "PATH_KEYS",
    "absolute_path",
    "load_datalist",
    "unlabeled_pool",
    "write_datalist",
]

DATALIST_FILENAME = "datalist.json"
PATH_KEYS = ("image", "label", "instance_label")
# lists whose items must reference a label
LABELLED_KEYS = ("training", "validation", "test")
# images a folder without a datalist contributes to the unlabelled pool (the readers' formats)
POOL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

logger = logging.getLogger(__name__)


def absolute_path(path: str | os.PathLike) -> str:
    """``path`` with ``~`` expanded, made absolute."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _read_datalist(dataset_dir: str) -> tuple[str, dict[str, Any]]:
    if not os.path.isdir(dataset_dir):
        what = "is not a folder" if os.path.exists(dataset_dir) else "does not exist"
        raise BundleInputError(f"dataset folder {dataset_dir} {what}")
    datalist_path = os.path.join(dataset_dir, DATALIST_FILENAME)
    if not os.path.isfile(datalist_path):
        raise BundleInputError(
            f"no {DATALIST_FILENAME} in the dataset folder {dataset_dir}; create one with "
            f"`python -m bundle.prepare glas --source SRC --output {dataset_dir} --split 10` or write it by hand"
        )
    try:
        with open(datalist_path, encoding="utf-8") as stream:
            content = json.load(stream)
    except json.JSONDecodeError as error:
        raise BundleInputError(
            f"{datalist_path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise BundleInputError(f"cannot read {datalist_path}: {error}") from error
    if not isinstance(content, dict):
        raise BundleInputError(
            f"{datalist_path} must hold a JSON object with lists such as 'training', got a {type(content).__name__}"
        )
    return datalist_path, content


def load_datalist(
    dataset_dir: str | os.PathLike,
    key: str,
    *,
    allow_empty: bool = False,
    check_files: bool = True,
    missing_ok: bool = False,
    require_label: bool | None = None,
    checks: DatalistChecks | Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Return the list ``key`` of ``dataset_dir/datalist.json`` with its paths made absolute.

    The values of :data:`PATH_KEYS` are resolved against ``dataset_dir`` (absolute paths are kept) and returned as
    absolute ``str`` paths; other keys are copied unchanged. Items of :data:`LABELLED_KEYS` must have a ``label``.
    With ``allow_empty`` a missing or empty list gives ``[]``; with ``check_files`` every referenced file must exist;
    with ``missing_ok`` a folder without a datalist gives ``[]`` (an optional pool such as ``unlabeled``);
    ``require_label`` overrides whether items need a ``label`` (default: the lists of :data:`LABELLED_KEYS`);
    ``checks`` runs :func:`bundle.data.checks.check_list` on the list (duplicates, sizes, mask classes).
    Raises :class:`BundleInputError` with a one-line message for every problem.
    """
    dataset_dir = absolute_path(dataset_dir)
    if missing_ok and not os.path.isfile(os.path.join(dataset_dir, DATALIST_FILENAME)):
        logger.info("no %s in %s: the %r list is empty", DATALIST_FILENAME, dataset_dir, key)
        return []
    datalist_path, content = _read_datalist(dataset_dir)
    items = _resolve_list(dataset_dir, datalist_path, content, key, allow_empty, check_files, require_label)
    if checks is not None and items:
        _run_checks(items, key, datalist_path, content, dataset_dir, checks)
    return items


def _resolve_list(
    dataset_dir: str,
    datalist_path: str,
    content: dict[str, Any],
    key: str,
    allow_empty: bool,
    check_files: bool,
    require_label: bool | None,
) -> list[dict[str, Any]]:
    if key not in content:
        if allow_empty:
            return []
        present = ", ".join(repr(name) for name, value in content.items() if isinstance(value, list)) or "none"
        raise BundleInputError(f"{datalist_path} has no {key!r} list (lists present: {present})")
    items = content[key]
    if not isinstance(items, list):
        raise BundleInputError(f"{key!r} in {datalist_path} must be a list of items, got a {type(items).__name__}")
    if not items and not allow_empty:
        raise BundleInputError(f"the {key!r} list in {datalist_path} is empty")

    if require_label is None:
        require_label = key in LABELLED_KEYS
    required = ("image", "label") if require_label else ("image",)
    resolved_items = []
    for index, item in enumerate(items):
        where = f"item {index} of {key!r} in {datalist_path}"
        if not isinstance(item, dict):
            raise BundleInputError(f"{where} must be an object with an 'image' path, got {item!r}")
        for name in required:
            if name not in item:
                raise BundleInputError(f"{where} has no {name!r} path")
        resolved = dict(item)
        for name in PATH_KEYS:
            if name not in item:
                continue
            value = item[name]
            if not isinstance(value, str) or not value:
                raise BundleInputError(f"{where}: {name!r} must be a non-empty path string, got {value!r}")
            path = _resolve(dataset_dir, value)
            if check_files and not os.path.isfile(path):
                raise BundleInputError(f"{where}: {name} {path} does not exist")
            resolved[name] = path
        resolved_items.append(resolved)
    return resolved_items


def _resolve(dataset_dir: str, value: str) -> str:
    return os.path.normpath(os.path.join(dataset_dir, os.path.expanduser(value)))


def _run_checks(
    items: list[dict[str, Any]],
    key: str,
    datalist_path: str,
    content: dict[str, Any],
    dataset_dir: str,
    checks: DatalistChecks | Mapping[str, Any],
) -> None:
    from bundle.data.checks import DISJOINT_LISTS, check_list

    # the images of the lists this one must not share an image with (well-formed items only: each list is
    # validated when it is loaded itself)
    others = {
        other: [
            _resolve(dataset_dir, item["image"])
            for item in content[other]
            if isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]
        ]
        for other in DISJOINT_LISTS.get(key, ())
        if isinstance(content.get(other), list)
    }
    seconds = check_list(items, key, datalist_path, checks, others)
    logger.info("checked the %d items of %r in %s in %.2f s", len(items), key, datalist_path, seconds)


def unlabeled_pool(
    folder: str | os.PathLike, checks: DatalistChecks | Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The unlabelled pool in ``folder``: the ``unlabeled`` list of its datalist, or else the images directly in it.

    A folder of images with no ``datalist.json`` (MONAI Label's studies folder, a folder of tiles) is a pool as it
    is: every PNG/JPEG/BMP/TIFF file directly inside it (not in sub-folders, so MONAI Label's ``labels/`` stay out),
    sorted by name. A folder that does not exist or holds neither gives an empty pool (training is supervised).
    With ``checks``, every image must be large enough for the training transforms (its header is read).
    """
    folder = absolute_path(folder)
    if os.path.isfile(os.path.join(folder, DATALIST_FILENAME)):
        return load_datalist(folder, "unlabeled", allow_empty=True, checks=checks)
    if not os.path.isdir(folder):
        logger.info("unlabelled pool folder %s does not exist: the pool is empty", folder)
        return []
    names = sorted(
        name
        for name in os.listdir(folder)
        if name.lower().endswith(POOL_SUFFIXES) and os.path.isfile(os.path.join(folder, name))
    )
    logger.info("unlabelled pool: %d images in %s (no %s there)", len(names), folder, DATALIST_FILENAME)
    pool = [{"image": os.path.join(folder, name)} for name in names]
    if checks is not None and pool:
        from bundle.data.checks import check_list

        check_list(pool, "unlabeled", f"the folder {folder}", checks)
    return pool


def write_datalist(datalist: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``datalist`` as 4-space-indented JSON to ``path`` atomically (a temporary file moved into place).

    Readers never see a half-written datalist, and an interrupted write leaves the previous file (or none).
    Returns the absolute path.
    """
    path = absolute_path(path)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(datalist, stream, indent=4)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
