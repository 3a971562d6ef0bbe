"""EBHI-Seg preparation (``python -m bundle.prepare ebhi-gland|ebhi-cancer``) on a small copy of the real layout,
the load-time binarisation of its anti-aliased labels, and one short training run on the prepared datalist."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from dataset_fixtures import EBHI_COUNTS, EBHI_FOLDER, EBHI_UNLABELLED, read_datalist, run_cli, snapshot, write_ebhi
from PIL import Image

from bundle.errors import BundleInputError
from bundle.prepare.ebhi import EBHI_TASKS, build_ebhi_datalist, find_ebhi_cases

GLAND_CLASSES = ["Normal", "Polyp", "Low-grade IN", "High-grade IN", "Serrated adenoma"]
LISTS = ("training", "validation", "unlabeled", "test")


@pytest.fixture(scope="module")
def ebhi_root(tmp_path_factory):
    return write_ebhi(tmp_path_factory.mktemp("ebhi_source"))


def _paths(datalist: dict, key: str) -> list[str]:
    return [item["image"] for item in datalist[key]]


def test_gland_task_from_the_command_line(ebhi_root, tmp_path, capsys):
    source = ebhi_root.parent
    before = snapshot(source)
    code, out, err = run_cli(
        capsys, "ebhi-gland", "--source", source, "--output", tmp_path / "out", "--labeled-percent", 50
    )
    assert code == 0, err
    assert err == ""  # what training needs is in dataset.json, not in a notice for the user to type
    # 27 labelled images: 3 validation (2.7), 5 test (5.4), 10 of the other 19 labelled (9.5); 9 + 2 without label
    dataset_file = tmp_path / "out" / "dataset.json"
    assert out.splitlines() == [
        f"wrote {tmp_path / 'out' / 'datalist.json'} and {dataset_file}; train with --config_file "
        f"\"['configs/train.json','{dataset_file}']\"",
        "training: 10 images (Normal 2, Polyp 2, Low-grade IN 3, High-grade IN 2, Serrated adenoma 1)",
        "validation: 3 images (Polyp 1, Low-grade IN 1, High-grade IN 1)",
        "unlabeled: 11 images (Normal 2, Polyp 3, Low-grade IN 3, High-grade IN 1, Serrated adenoma 2)",
        "test: 5 images (Normal 1, Polyp 1, Low-grade IN 1, High-grade IN 1, Serrated adenoma 1)",
    ]
    datalist = read_datalist(tmp_path / "out")
    assert {key: datalist[key] for key in ("dataset", "classes", "source", "seed")} == {
        "dataset": "ebhi-gland",
        "classes": GLAND_CLASSES,
        "source": str(ebhi_root),
        "seed": 0,
    }
    assert json.loads(dataset_file.read_text()) == {
        "dataset_dir": str(tmp_path / "out"),
        "num_classes": 2,
        "class_names": ["background", "gland"],
        "mask_mode": "threshold",
        "mask_threshold": 127,
        "min_object_area": 100,
    }
    first = datalist["training"][0]
    assert first == {
        "image": str(ebhi_root / "Normal" / "image" / f"{first['name']}.png"),
        "label": str(ebhi_root / "Normal" / "label" / f"{first['name']}.png"),
        "name": first["name"],
        "part": "Normal",
    }
    assert snapshot(source) == before


def test_gland_lists_are_disjoint_complete_and_labelled_where_needed(ebhi_root):
    datalist = build_ebhi_datalist(ebhi_root, "gland", labeled_percent=20, seed=5)
    all_images = [path for key in LISTS for path in _paths(datalist, key)]
    assert len(all_images) == len(set(all_images)) == sum(EBHI_COUNTS[c] for c in GLAND_CLASSES) + 2
    assert {item["part"] for key in LISTS for item in datalist[key]} == set(GLAND_CLASSES)
    for key in ("training", "validation", "test"):
        assert all(os.path.isfile(item["label"]) for item in datalist[key])
    assert all("label" not in item for item in datalist["unlabeled"])
    unlabelled_only = {f"{part}/{name}" for part, names in EBHI_UNLABELLED.items() for name in names}
    assert unlabelled_only <= {f"{item['part']}/{item['name']}" for item in datalist["unlabeled"]}
    assert len(datalist["training"]) == round(0.2 * 19)


def test_cancer_task_uses_adenocarcinoma_only(ebhi_root):
    datalist = build_ebhi_datalist(ebhi_root, "cancer", labeled_percent=50, val_fraction=0.125, test_fraction=0.25)
    assert datalist["classes"] == ["Adenocarcinoma"]
    settings = datalist["settings"]
    assert settings["class_names"] == ["background", "adenocarcinoma"] and settings["mask_mode"] == "threshold"
    assert "adenocarcinoma" in settings["class_descriptions"][1]  # not the train config's colon-gland text
    assert settings["min_object_area"] == 100  # 224 px images: not the gland model's 20x area
    counts = {key: len(datalist[key]) for key in LISTS}
    assert counts == {"training": 3, "validation": 1, "unlabeled": 2, "test": 2}  # 8: 1, 2, then 3 of 5
    assert {item["part"] for key in LISTS for item in datalist[key]} == {"Adenocarcinoma"}


def test_same_seed_same_datalist_other_seed_other_split(ebhi_root, tmp_path, capsys):
    outputs = {}
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        args = ["ebhi-gland", "--source", ebhi_root, "--output", tmp_path / run, "--labeled-percent", 30]
        assert run_cli(capsys, *args, "--seed", seed)[0] == 0
        outputs[run] = (tmp_path / run / "datalist.json").read_bytes()
    assert outputs["a"] == outputs["b"]
    first, other = json.loads(outputs["a"]), json.loads(outputs["c"])
    assert _paths(first, "validation") + _paths(first, "test") != _paths(other, "validation") + _paths(other, "test")


def test_source_is_the_class_root_or_the_folder_above(ebhi_root):
    root_a, cases_a = find_ebhi_cases(ebhi_root, EBHI_TASKS["gland"])
    root_b, cases_b = find_ebhi_cases(ebhi_root.parent, EBHI_TASKS["gland"])
    assert root_a == root_b == str(ebhi_root) and cases_a == cases_b
    assert [case.part for case in cases_a][:2] == ["Normal", "Normal"]


def test_two_candidate_roots_are_ambiguous(tmp_path):
    write_ebhi(tmp_path / "a", counts={"Adenocarcinoma": 2})
    write_ebhi(tmp_path / "b", counts={"Adenocarcinoma": 2})
    (tmp_path / "both").mkdir()
    (tmp_path / "a" / EBHI_FOLDER).rename(tmp_path / "both" / "first")
    (tmp_path / "b" / EBHI_FOLDER).rename(tmp_path / "both" / "second")
    with pytest.raises(BundleInputError, match=r"EBHI-Seg class folders found in several folders of .*both"):
        find_ebhi_cases(tmp_path / "both", EBHI_TASKS["cancer"])


def test_missing_class_folder_is_named(tmp_path):
    root = write_ebhi(tmp_path, counts={"Normal": 2, "Adenocarcinoma": 2})
    with pytest.raises(BundleInputError) as error:
        find_ebhi_cases(root, EBHI_TASKS["gland"])
    assert str(error.value) == (
        f"EBHI-Seg source {root} has no 'Polyp' folder with image/ and label/ inside, needed by the gland task "
        "(found: Normal, Adenocarcinoma)"
    )


def test_label_without_image_is_named(tmp_path):
    root = write_ebhi(tmp_path, counts={"Adenocarcinoma": 3})
    label = root / "Adenocarcinoma" / "label" / "GT2099-0001-400-001.png"
    Image.new("L", (32, 32)).save(label)
    with pytest.raises(BundleInputError) as error:
        build_ebhi_datalist(root, "cancer", labeled_percent=50)
    assert str(error.value) == (
        f"label {label} has no image: expected {root / 'Adenocarcinoma' / 'image' / 'GT2099-0001-400-001'} with the "
        "same name"
    )


def test_labels_are_binarised_above_127_when_loaded(ebhi_root):
    """The labels really are anti-aliased, and the bundle's threshold mode turns them into label > 127."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from bundle.data.readers import mask_readers
    from bundle.data.transforms import MaskToClassd

    path = sorted((ebhi_root / "Polyp" / "label").glob("*.png"))[0]
    values = np.asarray(Image.open(path))
    assert len(np.unique(values)) > 2 and {0, 255} <= set(np.unique(values).tolist())
    load = Compose(
        [
            LoadImaged("label", reader=mask_readers(), image_only=True),
            EnsureChannelFirstd("label"),
            MaskToClassd("label", mode="threshold", threshold=127),
        ]
    )
    classes = load({"label": str(path)})["label"]
    assert np.array_equal(np.asarray(classes[0]), (values > 127).astype(np.int64))


def test_prepared_datalist_trains_with_its_dataset_json(tmp_path, capsys):
    """A couple of iterations of the core bundle on a prepared EBHI-Seg datalist, its ``dataset.json`` merged after
    ``configs/train.json`` as users do: ``mask_mode`` comes from there, typed by nobody."""
    from helpers import config_files, make_workflow, record_terms, small_overrides

    source = write_ebhi(tmp_path / "source", size=64, counts={name: 3 for name in GLAND_CLASSES})
    data = tmp_path / "data"
    assert run_cli(capsys, "ebhi-gland", "--source", source, "--output", data, "--labeled-percent", 50)[0] == 0
    overrides = small_overrides(tmp_path, data, max_epochs=1, epoch_length=2)
    del overrides["dataset_dir"]
    workflow = make_workflow(config_files() + [str(data / "dataset.json")], **overrides)
    workflow.initialize()
    assert workflow.parser.get_parsed_content("load_mask")[2].converter.mode == "threshold"
    history = record_terms(workflow.parser.get_parsed_content("train#trainer"))
    workflow.run()
    workflow.finalize()
    assert len(history) == 2 and all(math.isfinite(terms["loss_x"]) for terms in history)
    assert (tmp_path / "out" / "checkpoints" / "last.pt").is_file()
