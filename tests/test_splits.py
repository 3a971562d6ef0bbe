"""The seeded split shared by the dataset preparers: reproducible, disjoint, stratified, with clear errors."""

from __future__ import annotations

import pytest

from bundle.errors import BundleInputError
from bundle.prepare.splits import apportion, round_half_up, seeded_split

NAMES = [f"case_{index:02d}" for index in range(40)]


def test_same_seed_same_split_other_seed_other_split_any_input_order():
    first = seeded_split(NAMES, labeled_percent=25, val_fraction=0.1, test_fraction=0.2, seed=3)
    again = seeded_split(list(reversed(NAMES)), labeled_percent=25, val_fraction=0.1, test_fraction=0.2, seed=3)
    other = seeded_split(NAMES, labeled_percent=25, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert first == again
    assert first != other


def test_fixed_seed_gives_a_fixed_split():
    """``random.Random(seed).shuffle`` of the sorted names is the same on every platform: pin one result."""
    split = seeded_split(NAMES[:10], labeled_percent=50, val_fraction=0.1, test_fraction=0.2, seed=0)
    # shuffled order: 07, 08, 01, 05, 03, 04, 02, 00, 09, 06 -> 1 validation, 2 test, half of the other 7 labelled
    assert (split.validation, split.test) == (["case_07"], ["case_01", "case_08"])
    assert split.labelled == ["case_02", "case_03", "case_04", "case_05"]
    assert split.unlabeled == ["case_00", "case_06", "case_09"]


def test_lists_are_disjoint_cover_everything_and_have_the_rounded_sizes():
    with_mask = set(NAMES[:30])
    split = seeded_split(NAMES, labeled_percent=10, val_fraction=0.1, test_fraction=0.2, seed=0, with_mask=with_mask)
    lists = [split.labelled, split.unlabeled, split.validation, split.test]
    assert sorted(name for names in lists for name in names) == NAMES
    assert (len(split.validation), len(split.test), len(split.labelled)) == (3, 6, 2)  # 21 left, 10 % -> 2.1 -> 2
    assert set(split.validation + split.test + split.labelled) <= with_mask
    assert set(NAMES[30:]) <= set(split.unlabeled)


def test_strata_are_split_in_proportion_with_exact_totals():
    strata = {name: "big" if index < 30 else "small" for index, name in enumerate(NAMES)}
    split = seeded_split(NAMES, labeled_percent=50, val_fraction=0.25, test_fraction=0.25, seed=1, strata=strata)
    assert len(split.validation) == len(split.test) == 10
    # quotas 7.5 and 2.5: the tied remainder goes to the first group by name
    assert sum(strata[name] == "small" for name in split.validation) == 2
    assert len(split.labelled) == 10


def test_rounding_and_apportioning():
    assert [round_half_up(value) for value in (0.5, 1.5, 2.5, 0.35 * 10, 2.49)] == [1, 2, 3, 4, 2]
    assert apportion(3, {"a": 5, "b": 7, "c": 5, "d": 6, "e": 4}) == {"a": 1, "b": 1, "c": 0, "d": 1, "e": 0}
    assert apportion(0, {"a": 0}) == {"a": 0}


def test_too_small_a_labeled_percentage_is_explained():
    with pytest.raises(BundleInputError) as error:
        seeded_split(NAMES[:12], labeled_percent=2, val_fraction=0.1, test_fraction=0.1, seed=0, what="tiles")
    assert str(error.value) == (
        "--labeled-percent 2 of the 10 training tiles with a mask gives no labelled image; use at least 5"
    )


def test_no_masks_and_bad_fractions_are_refused():
    with pytest.raises(BundleInputError, match=r"^none of the 3 images has a mask, so none can be labelled$"):
        seeded_split(["a", "b", "c"], labeled_percent=50, with_mask=set())
    with pytest.raises(BundleInputError, match=r"^--val-fraction 0.1 of the 4 images with a mask gives no image"):
        seeded_split(["a", "b", "c", "d"], labeled_percent=50, val_fraction=0.1)
    with pytest.raises(BundleInputError, match=r"^--labeled-percent must be more than 0 and at most 100, got 0$"):
        seeded_split(NAMES, labeled_percent=0)
    with pytest.raises(BundleInputError, match=r"leave no training images"):
        seeded_split(NAMES, labeled_percent=10, val_fraction=0.5, test_fraction=0.5)
