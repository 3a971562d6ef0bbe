"""Command line that turns a downloaded dataset into a datalist the bundle can train on.

    python -m bundle.prepare glas --source SRC --output OUT --split {10,20,100} [--force]

Each dataset is one sub-command (more can be added to ``_DATASETS``). The source folder is only read; the command
writes ``OUT/datalist.json`` (absolute paths into the source) and prints one summary line per list. Problems with
the input are reported as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from bundle.data.datalist import DATALIST_FILENAME
from bundle.data.glas import GLAS_SPLITS, prepare_glas
from bundle.errors import BundleInputError

__all__ = ["build_parser", "main", "summarize_datalist"]

_LISTS = ("training", "validation", "unlabeled", "test")


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
    parser.add_argument("--output", required=True, help=f"folder to write {DATALIST_FILENAME} to (created if needed)")
    parser.add_argument(
        "--split", required=True, type=int, choices=GLAS_SPLITS, help="percentage of labelled training images"
    )
    parser.add_argument("--force", action="store_true", help=f"overwrite an existing {DATALIST_FILENAME}")
    parser.set_defaults(run=_run_glas)


def _run_glas(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_glas(args.source, args.output, args.split, force=args.force)


# sub-command name -> function that adds its parser; each parser sets `run` (args -> written datalist)
_DATASETS: dict[str, Callable[[argparse._SubParsersAction], None]] = {"glas": _add_glas}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bundle.prepare", description="Write the datalist.json of a dataset for this bundle."
    )
    subparsers = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for add_dataset in _DATASETS.values():
        add_dataset(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0 on success, 2 on a problem with the input (printed as one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    try:
        datalist = args.run(args)
    except BundleInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(os.path.abspath(os.path.expanduser(args.output)), DATALIST_FILENAME)}")
    for line in summarize_datalist(datalist):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
