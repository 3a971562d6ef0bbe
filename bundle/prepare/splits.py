"""Seeded, reproducible labelled / unlabelled / validation / test splits for the dataset preparers.

:func:`seeded_split` sorts the names, shuffles them with ``random.Random(seed)`` (the same result on every platform
and Python 3 version) and cuts validation, test and labelled sets by fractions. Only names that have a mask can be
validation, test or labelled; the others always end up unlabelled. With ``strata`` (e.g. the class or disease of
each name) every stratum is split in proportion, and the counts are apportioned by largest remainder so that the
totals are those of the whole set (``round(fraction * count)``, halves rounded up).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bundle.errors import BundleInputError

__all__ = ["Split", "apportion", "round_half_up", "seeded_split", "validate_fractions"]

_EPSILON = 1e-9  # 0.35 * 10 is 3.4999999999999996 in binary floating point


@dataclass(frozen=True)
class Split:
    """Names per list, each sorted."""

    labelled: list[str]
    unlabeled: list[str]
    validation: list[str]
    test: list[str]

    def datalist_lists(self, items: Callable[[list[str], bool], list[dict[str, Any]]]) -> dict[str, list[dict]]:
        """The datalist's four lists; ``items(names, labelled)`` turns names into datalist items."""
        return {
            "training": items(self.labelled, True),
            "validation": items(self.validation, True),
            "unlabeled": items(self.unlabeled, False),
            "test": items(self.test, True),
        }


def round_half_up(value: float) -> int:
    """``round`` with halves going up (Python's ``round`` sends 2.5 to 2)."""
    return math.floor(value + 0.5 + _EPSILON)


def apportion(total: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` over the groups of ``sizes`` in proportion (largest remainder, ties by group name)."""
    whole = sum(sizes.values())
    if whole == 0:
        return {group: 0 for group in sizes}
    quotas = {group: total * size / whole for group, size in sizes.items()}
    counts = {group: min(sizes[group], math.floor(quota + _EPSILON)) for group, quota in quotas.items()}
    by_remainder = sorted(sizes, key=lambda group: (-(quotas[group] - counts[group]), group))
    left = total - sum(counts.values())
    for group in by_remainder:
        if left <= 0:
            break
        if counts[group] < sizes[group]:
            counts[group] += 1
            left -= 1
    return counts


def validate_fractions(labeled_percent: float, val_fraction: float, test_fraction: float) -> None:
    """Raise :class:`BundleInputError` unless 0 < labeled_percent <= 100, fractions >= 0 and their sum < 1."""
    if not 0 < labeled_percent <= 100:
        raise BundleInputError(f"--labeled-percent must be more than 0 and at most 100, got {labeled_percent:g}")
    for option, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise BundleInputError(f"{option} must be at least 0 and less than 1, got {value:g}")
    if val_fraction + test_fraction >= 1:
        raise BundleInputError(
            f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} leave no training images"
        )


def _take(counts: Mapping[str, int], shuffled: Mapping[str, list[str]]) -> list[str]:
    taken = []
    for group, count in counts.items():
        taken += shuffled[group][:count]
        del shuffled[group][:count]
    return taken


def seeded_split(
    names: Iterable[str],
    *,
    labeled_percent: float,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    with_mask: Collection[str] | None = None,
    strata: Mapping[str, str] | None = None,
    what: str = "images",
) -> Split:
    """Split ``names`` into labelled, unlabelled, validation and test lists.

    ``round(val_fraction * n)`` and ``round(test_fraction * n)`` of the ``n`` names that have a mask (all names when
    ``with_mask`` is ``None``) become validation and test; ``round(labeled_percent / 100 * m)`` of the ``m`` remaining
    names with a mask become labelled, and everything else is unlabelled. Raises :class:`BundleInputError` when no
    name has a mask, or when a requested list would be empty (too few names for the fraction).
    """
    validate_fractions(labeled_percent, val_fraction, test_fraction)
    ordered = sorted(set(names))
    masked = [name for name in ordered if with_mask is None or name in with_mask]
    if not masked:
        raise BundleInputError(f"none of the {len(ordered)} {what} has a mask, so none can be labelled")
    group_of = {name: (strata or {}).get(name, "") for name in ordered}
    rng = random.Random(seed)
    shuffled: dict[str, list[str]] = {}
    for name in masked:
        shuffled.setdefault(group_of[name], []).append(name)
    shuffled = {group: shuffled[group] for group in sorted(shuffled)}
    for group_names in shuffled.values():
        rng.shuffle(group_names)

    def sizes() -> dict[str, int]:
        return {group: len(group_names) for group, group_names in shuffled.items()}

    masked_count = len(masked)
    validation = _take(apportion(round_half_up(val_fraction * masked_count), sizes()), shuffled)
    test = _take(apportion(round_half_up(test_fraction * masked_count), sizes()), shuffled)
    requested = (("--val-fraction", val_fraction, validation), ("--test-fraction", test_fraction, test))
    for option, fraction, chosen in requested:
        if fraction > 0 and not chosen:
            raise BundleInputError(
                f"{option} {fraction:g} of the {masked_count} {what} with a mask gives no image; "
                f"use at least {math.ceil(5000 / masked_count) / 10000:g}"
            )
    pool = sum(sizes().values())
    if pool == 0:
        raise BundleInputError(f"no {what} with a mask are left for training after validation and test")
    labelled = _take(apportion(round_half_up(labeled_percent / 100 * pool), sizes()), shuffled)
    if not labelled:
        raise BundleInputError(
            f"--labeled-percent {labeled_percent:g} of the {pool} training {what} with a mask gives no labelled "
            f"image; use at least {math.ceil(5000 / pool) / 100:g}"
        )
    chosen = set(labelled) | set(validation) | set(test)
    return Split(
        labelled=sorted(labelled),
        unlabeled=[name for name in ordered if name not in chosen],
        validation=sorted(validation),
        test=sorted(test),
    )
