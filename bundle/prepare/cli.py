"""Command line that turns a downloaded dataset into a datalist the bundle can train on.

    python -m bundle.prepare glas --source SRC --output OUT --split {10,20,100} [--force]
    python -m bundle.prepare ebhi-gland --source SRC --output OUT --labeled-percent 10 [--seed 0]
    python -m bundle.prepare ebhi-cancer --source SRC --output OUT --labeled-percent 10 [--seed 0]
    python -m bundle.prepare kpi --source SRC --output OUT --labeled-percent 10 [--tile-size 512]
    python -m bundle.prepare monuseg --source SRC [--test-source TEST] --output OUT --labeled-percent 10
    python -m bundle.prepare folders --images DIR --masks DIR [--mask-suffix _mask] --output OUT

Each dataset is one sub-command (registered in ``_DATASETS``); ``docs/datasets.md`` describes each layout and split.
Sources are only read; the command writes ``OUT/datalist.json`` (absolute paths) and ``OUT/dataset.json`` (a config
override file: ``dataset_dir`` and the dataset's classes and mask settings, merged after ``configs/train.json``), plus
tiles or masks under ``OUT`` for KPI and MoNuSeg, and prints one summary line per list. Notices (grayscale or RGBA
images, skipped annotations) are printed as ``notice: ...`` lines on stderr. Problems with the input, and an output that
cannot be written (read-only, no permission, a full disk), are reported as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from bundle.data.datalist import DATALIST_FILENAME, absolute_path
from bundle.errors import BundleInputError
from bundle.prepare.checks import MASK_KINDS
from bundle.prepare.ebhi import EBHI_TASKS, prepare_ebhi
from bundle.prepare.folders import prepare_folders
from bundle.prepare.glas import GLAS_SPLITS, prepare_glas
from bundle.prepare.kpi import prepare_kpi
from bundle.prepare.monuseg import prepare_monuseg
from bundle.prepare.output import DATASET_FILENAME

__all__ = ["build_parser", "main", "summarize_datalist"]

_LISTS = ("training", "validation", "unlabeled", "test")
# the preparers log their notices (grayscale/RGBA images, training overrides) as warnings below this logger
_NOTICE_LOGGER = "bundle.prepare"


def summarize_datalist(datalist: dict[str, Any]) -> list[str]:
    """One line per list with its number of images (and, where items have a ``part``, the count per part)."""
    lines = []
    for key in _LISTS:
        items = datalist.get(key, [])
        parts = Counter(item["part"] for item in items if "part" in item)
        line = f"{key}: {len(items)} images"
        if len(parts) > 1:
            line += " (" + ", ".join(f"{part} {count}" for part, count in parts.items()) + ")"
        lines.append(line)
    return lines


def _add_glas(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "glas",
        help="GlaS (Warwick-QU) colon gland segmentation",
        description="Write the datalist of the GlaS semi-supervised split used in the literature: 12 validation "
        "images, 7 (10 %) or 14 (20 %) labelled training images, the rest of train unlabelled, testA+testB as test.",
    )
    parser.add_argument(
        "--source",
        required=True,
        help="GlaS folder: images/<name>.png + masks/<name>.png, or the official release (<name>.bmp, <name>_anno.bmp)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help=f"folder to write {DATALIST_FILENAME} and {DATASET_FILENAME} to (created if needed)",
    )
    parser.add_argument(
        "--split", required=True, type=int, choices=GLAS_SPLITS, help="percentage of labelled training images"
    )
    parser.add_argument("--force", action="store_true", help=f"overwrite an existing {DATALIST_FILENAME}")
    parser.set_defaults(run=_run_glas)


def _split_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options :func:`_add_common` adds, as the preparers' keyword arguments."""
    names = ("labeled_percent", "val_fraction", "test_fraction", "seed", "force")
    return {name: getattr(args, name) for name in names}


def _run_glas(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_glas(args.source, args.output, args.split, force=args.force)


def _add_common(
    parser: argparse.ArgumentParser,
    *,
    labeled_required: bool = True,
    test_fraction: float | None = 0.2,
    test_fraction_help: str = "",
) -> None:
    """--output, --labeled-percent, --val-fraction, --test-fraction, --seed and --force."""
    parser.add_argument(
        "--output",
        required=True,
        help=f"folder to write {DATALIST_FILENAME} and {DATASET_FILENAME} to (created if needed)",
    )
    parser.add_argument(
        "--labeled-percent",
        "--labelled-percent",  # the old spelling, still accepted
        dest="labeled_percent",
        type=float,
        required=labeled_required,
        default=None if labeled_required else 100.0,
        metavar="P",
        help="percentage of the training images with a mask that are labelled (e.g. 10, 20)"
        + ("" if labeled_required else "; default 100"),
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F", help="fraction of images for validation (0.1)"
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=test_fraction,
        metavar="F",
        help=test_fraction_help or "fraction of images for test (0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (0); the same seed gives the same split")
    parser.add_argument("--force", action="store_true", help=f"overwrite an existing {DATALIST_FILENAME}")


def _add_ebhi(subparsers: argparse._SubParsersAction, task: str) -> None:
    classes = ", ".join(EBHI_TASKS[task].classes)
    parser = subparsers.add_parser(
        f"ebhi-{task}",
        help=f"EBHI-Seg {task} segmentation ({classes})",
        description=f"Write the datalist of the EBHI-Seg {task} task (classes {classes}): seeded per-class "
        "validation, test and labelled splits; items carry the class as 'part'. Labels are binarised at load time "
        "(dataset.json sets mask_mode).",
    )
    parser.add_argument(
        "--source", required=True, help="EBHI-Seg folder holding <class>/image/*.png and <class>/label/*.png"
    )
    _add_common(parser)
    parser.set_defaults(run=_run_ebhi, task=task)


def _run_ebhi(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_ebhi(args.source, args.output, args.task, **_split_options(args))


def _add_kpi(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "kpi",
        help="KPIs 2024 glomerulus segmentation (patch level)",
        description="Tile the KPIs 2024 training patches (with binarised masks) into OUT/tiles, binarise the "
        "validation and test masks into OUT/masks, and write the datalist; items carry the disease as 'part'.",
    )
    parser.add_argument(
        "--source",
        required=True,
        help="folder holding train/ (and validation/, test/) with <disease>/<slide>/img/*_img.jpg and mask/*_mask.jpg",
    )
    parser.add_argument("--tile-size", type=int, default=512, help="side of the training tiles in pixels (512)")
    _add_common(
        parser,
        test_fraction=0.2,
        test_fraction_help="without a test/ folder: fraction of the training slides for test (0.2); "
        "--val-fraction likewise without a validation/ folder",
    )
    parser.set_defaults(run=_run_kpi)


def _run_kpi(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_kpi(args.source, args.output, tile_size=args.tile_size, **_split_options(args))


def _add_monuseg(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monuseg",
        help="MoNuSeg-style nuclei: TIFF images with Aperio XML polygons (or mask files)",
        description="Rasterise the Aperio XML polygons into instance and binary masks under OUT/masks and write "
        "the datalist ('label' = binary mask, 'instance_label' = instance mask).",
    )
    parser.add_argument(
        "--source",
        required=True,
        help="folder with Tissue Images/*.tif and Annotations/*.xml, or *.tif with *.xml, or *.tif with Masks/*.png",
    )
    parser.add_argument("--test-source", help="a second such folder used as the test list (e.g. MoNuSegTestData)")
    _add_common(
        parser,
        test_fraction=None,
        test_fraction_help="fraction of the images for test when there is no --test-source (0.2)",
    )
    parser.set_defaults(run=_run_monuseg)


def _run_monuseg(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_monuseg(args.source, args.output, test_source=args.test_source, **_split_options(args))


def _add_folders(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "folders",
        help="any images folder with a masks folder, matched by name",
        description="Match images and masks by name (optionally with a mask suffix); images without a mask are "
        "unlabelled; seeded validation, test and labelled splits.",
    )
    parser.add_argument("--images", required=True, help="folder of images (png, jpg, jpeg, bmp, tif, tiff)")
    parser.add_argument("--masks", required=True, help="folder of masks (may be --images when --mask-suffix is set)")
    parser.add_argument(
        "--mask-suffix", default="", help="the mask of <name>.png is <name><suffix>.png, e.g. _mask (default: none)"
    )
    parser.add_argument("--unlabeled", help="folder of further images without masks")
    parser.add_argument(
        "--mask-type",
        choices=MASK_KINDS,
        default="binary",
        help="binary: 0/255 or 0/1 (default); instance: integer object ids; grey: 8-bit, foreground > 127",
    )
    _add_common(parser, labeled_required=False)
    parser.set_defaults(run=_run_folders)


def _run_folders(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_folders(
        args.images,
        args.masks,
        args.output,
        mask_suffix=args.mask_suffix,
        unlabeled=args.unlabeled,
        mask_type=args.mask_type,
        **_split_options(args),
    )


# sub-command name -> function that adds its parser; each parser sets `run` (args -> written datalist)
_DATASETS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "glas": _add_glas,
    "ebhi-gland": lambda subparsers: _add_ebhi(subparsers, "gland"),
    "ebhi-cancer": lambda subparsers: _add_ebhi(subparsers, "cancer"),
    "kpi": _add_kpi,
    "monuseg": _add_monuseg,
    "folders": _add_folders,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bundle.prepare", description="Write the datalist.json of a dataset for this bundle."
    )
    subparsers = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for add_dataset in _DATASETS.values():
        add_dataset(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0 on success, 2 on a problem with the input or the output folder (printed as one
    ``error:`` line).

    Notices of the preparers are printed as ``notice: ...`` lines on stderr.
    """
    args = build_parser().parse_args(argv)
    notices = logging.getLogger(_NOTICE_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("notice: %(message)s"))
    notices.addHandler(handler)
    propagate, notices.propagate = notices.propagate, False
    try:
        datalist = args.run(args)
    except BundleInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read or write the checks could not foresee (a full disk): the file and the reason
        where = f"{os.fspath(error.filename)}: " if error.filename is not None else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    finally:
        notices.removeHandler(handler)
        notices.propagate = propagate
    output = absolute_path(args.output)
    dataset_file = os.path.join(output, DATASET_FILENAME)
    print(
        f"wrote {os.path.join(output, DATALIST_FILENAME)} and {dataset_file}; train with --config_file "
        f"\"['configs/train.json','{dataset_file}']\""
    )
    for line in summarize_datalist(datalist):
        print(line)
    return 0
