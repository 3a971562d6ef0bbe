"""Generic preparation (``python -m bundle.prepare folders``): images and masks matched by name or suffix, extra
unlabelled images, mask types, seeded splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dataset_fixtures import read_datalist, run_cli, snapshot, tissue, write_folders
from PIL import Image

from bundle.errors import BundleInputError
from bundle.prepare.folders import build_folders_datalist, find_folder_cases

LISTS = ("training", "validation", "unlabeled", "test")


def test_same_stem_matching_from_the_command_line(tmp_path, capsys):
    source = write_folders(tmp_path / "source", labelled=10, unlabelled=3)
    before = snapshot(source)
    out = tmp_path / "out"
    args = ["folders", "--images", source / "images", "--masks", source / "masks", "--output", out]
    code, stdout, err = run_cli(capsys, *args, "--labeled-percent", 50, "--seed", 1)
    assert code == 0 and err == ""
    # 10 masks: 1 validation, 2 test, 4 of the other 7 labelled (3.5); 3 + 3 without mask unlabelled
    assert stdout.splitlines()[1:] == [
        "training: 4 images",
        "validation: 1 images",
        "unlabeled: 6 images",
        "test: 2 images",
    ]
    datalist = read_datalist(out)
    for key in ("training", "validation", "test"):
        for item in datalist[key]:
            assert item == {
                "image": str(source / "images" / f"{item['name']}.png"),
                "label": str(source / "masks" / f"{item['name']}.png"),
                "name": item["name"],
            }
    unlabelled = [item["name"] for item in datalist["unlabeled"]]
    assert {"case_10", "case_11", "case_12"} <= set(unlabelled)
    names = sorted(item["name"] for key in LISTS for item in datalist[key])
    assert names == [f"case_{index:02d}" for index in range(13)]
    assert (datalist["mask_type"], datalist["seed"], datalist["labeled_percent"]) == ("binary", 1, 50.0)
    assert snapshot(source) == before


def test_default_is_every_masked_training_image_labelled_and_seeds_decide(tmp_path):
    source = write_folders(tmp_path / "source", labelled=20, unlabelled=0)
    first = build_folders_datalist(source / "images", source / "masks", seed=0)
    again = build_folders_datalist(source / "images", source / "masks", seed=0)
    other = build_folders_datalist(source / "images", source / "masks", seed=9)
    assert first == again and first != other
    assert {key: len(first[key]) for key in LISTS} == {"training": 14, "validation": 2, "unlabeled": 0, "test": 4}
    assert json.dumps(first) == json.dumps(again)


def test_masks_with_a_suffix_in_the_same_folder(tmp_path):
    source = write_folders(tmp_path / "source", labelled=6, unlabelled=2, suffix="_mask")
    for mask in (source / "masks").iterdir():
        mask.rename(source / "images" / mask.name)
    cases = find_folder_cases(source / "images", source / "images", mask_suffix="_mask")
    assert [case.name for case in cases] == [f"case_{index:02d}" for index in range(8)]
    assert cases[0].mask == str(source / "images" / "case_00_mask.png") and cases[7].mask is None
    with pytest.raises(BundleInputError, match=r"are the same folder .*; give the masks' --mask-suffix"):
        find_folder_cases(source / "images", source / "images")


def test_extra_unlabelled_folder_and_instance_masks(tmp_path):
    source = write_folders(tmp_path / "source", labelled=6, unlabelled=0)
    (tmp_path / "more").mkdir()
    for index in range(3):
        Image.fromarray(tissue((24, 24), 50 + index)).save(tmp_path / "more" / f"extra_{index}.jpg")
    for index in range(6):
        ids = np.zeros((24, 24), dtype=np.uint16)
        ids[2:8, 2:8], ids[12:20, 10:22] = 1, 2 + index
        Image.fromarray(ids).save(source / "masks" / f"case_{index:02d}.png")
    datalist = build_folders_datalist(
        source / "images", source / "masks", unlabeled=tmp_path / "more", mask_type="instance", test_fraction=0.0
    )
    assert {key: len(datalist[key]) for key in LISTS} == {"training": 5, "validation": 1, "unlabeled": 3, "test": 0}
    assert all(item["instance_label"] == item["label"] for item in datalist["training"])
    assert [item["name"] for item in datalist["unlabeled"]] == ["extra_0", "extra_1", "extra_2"]


def test_grey_masks_set_the_threshold_mask_mode_in_dataset_json(tmp_path, capsys):
    source = write_folders(tmp_path / "source", labelled=6, unlabelled=0)
    Image.fromarray(np.full((24, 24), 200, dtype=np.uint8)).save(source / "masks" / "case_03.png")
    args = ["folders", "--images", source / "images", "--masks", source / "masks", "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *args, "--mask-type", "grey", "--test-fraction", "0")
    assert code == 0 and err == ""
    settings = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert settings == {
        "dataset_dir": str(tmp_path / "out"),
        "mask_mode": "threshold",
        "mask_threshold": 127,
        "min_object_area": 0,  # objects of unknown size: the gland model's clean-up is not applied
        "fill_holes": False,
    }
    # binary masks need nothing else
    binary = write_folders(tmp_path / "binary_source", labelled=6, unlabelled=0)
    args = ["folders", "--images", binary / "images", "--masks", binary / "masks", "--output", tmp_path / "binary"]
    code, _, _ = run_cli(capsys, *args, "--test-fraction", "0")
    assert code == 0 and json.loads((tmp_path / "binary" / "dataset.json").read_text()) == {
        "dataset_dir": str(tmp_path / "binary"),
        "min_object_area": 0,
        "fill_holes": False,
    }


def test_mask_without_image_and_two_masks_for_one_image_are_named(tmp_path):
    source = write_folders(tmp_path / "source", labelled=4, unlabelled=0, suffix="_mask")
    orphan = source / "masks" / "case_99_mask.png"
    Image.new("L", (24, 24)).save(orphan)
    with pytest.raises(BundleInputError) as error:
        find_folder_cases(source / "images", source / "masks", mask_suffix="_mask")
    assert str(error.value) == f"mask {orphan} has no image: expected {source / 'images' / 'case_99'}.<png|jpg|tif>"
    orphan.unlink()
    with pytest.raises(BundleInputError, match=r"^mask .*case_00_mask\.png does not end with the mask suffix '_m'$"):
        find_folder_cases(source / "images", source / "masks", mask_suffix="_m")


def test_a_dataset_json_of_the_user_is_kept_unless_forced_and_the_old_flag_still_works(tmp_path, capsys):
    source = write_folders(tmp_path / "source", labelled=6, unlabelled=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text('{"mine": true}')
    args = ["folders", "--images", source / "images", "--masks", source / "masks", "--output", out]
    code, _, err = run_cli(capsys, *args, "--labelled-percent", 50, "--test-fraction", "0")
    assert code == 2 and err == f"error: {out / 'dataset.json'} already exists; pass --force to overwrite it\n"
    assert (out / "dataset.json").read_text() == '{"mine": true}' and not (out / "datalist.json").exists()
    code, _, _ = run_cli(capsys, *args, "--labelled-percent", 50, "--test-fraction", "0", "--force")
    assert code == 0 and json.loads((out / "datalist.json").read_text())["labeled_percent"] == 50
