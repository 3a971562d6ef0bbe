"""Tests of datalist loading/validation (``load_datalist``) and of the default dataset (``ensure_dataset``)."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import pytest

import bundle.prepare.synthetic
from bundle.data.datalist import DATALIST_FILENAME, PATH_KEYS, load_datalist, unlabeled_pool, write_datalist
from bundle.errors import BundleInputError
from bundle.prepare.glas import prepare_glas
from bundle.prepare.synthetic import ensure_dataset


def _write(folder: Path, content) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATALIST_FILENAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _error(*args, **kwargs) -> str:
    with pytest.raises(BundleInputError) as error:
        load_datalist(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_constants():
    assert DATALIST_FILENAME == "datalist.json"
    assert PATH_KEYS == ("image", "label", "instance_label")


@pytest.fixture(scope="module")
def glas_datalist_dir(glas_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glas10")
    prepare_glas(glas_dir, out, 10)
    return out


def test_prepared_glas_datalist_loads(glas_datalist_dir, glas_dir):
    glas_dir = Path(os.path.abspath(glas_dir))
    training = load_datalist(glas_datalist_dir, "training")
    assert [item["name"] for item in training] == [
        "train_4",
        "train_17",
        "train_23",
        "train_28",
        "train_60",
        "train_74",
        "train_85",
    ]
    assert training[1] == {
        "image": str(glas_dir / "images" / "train_17.png"),
        "label": str(glas_dir / "masks" / "train_17.png"),
        "label_type": "binary",
        "name": "train_17",
        "part": "train",
    }
    unlabeled = load_datalist(glas_datalist_dir, "unlabeled")
    assert len(unlabeled) == 66 and all(set(item) == {"image", "name", "part"} for item in unlabeled)
    test = load_datalist(glas_datalist_dir, "test")
    assert len(test) == 80 and {item["part"] for item in test} == {"testA", "testB"}
    assert len(load_datalist(str(glas_datalist_dir), "validation")) == 12


def test_relative_and_absolute_paths_are_resolved(tmp_path, monkeypatch):
    dataset = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere" / "b.png"
    _touch(dataset / "images" / "a.png", dataset / "masks" / "a.png", dataset / "inst" / "a.png", elsewhere)
    _touch(tmp_path / "shared" / "c.png")
    items = [
        {"image": "images/a.png", "label": "masks/a.png", "instance_label": "inst/a.png", "name": "a", "extra": [1]},
        {"image": str(elsewhere), "label": "./masks/../masks/a.png"},
        {"image": "../shared/c.png", "label": "masks/a.png"},
    ]
    _write(dataset, {"training": items})
    monkeypatch.chdir(tmp_path / "elsewhere")  # resolution must not depend on the working directory
    loaded = load_datalist(os.path.relpath(dataset), "training")
    assert loaded == [
        {
            "image": str(dataset / "images" / "a.png"),
            "label": str(dataset / "masks" / "a.png"),
            "instance_label": str(dataset / "inst" / "a.png"),
            "name": "a",
            "extra": [1],
        },
        {"image": str(elsewhere), "label": str(dataset / "masks" / "a.png")},
        {"image": str(tmp_path / "shared" / "c.png"), "label": str(dataset / "masks" / "a.png")},
    ]
    # the file on disk is not changed by loading
    assert json.loads((dataset / DATALIST_FILENAME).read_text())["training"] == items


def test_missing_dataset_folder(tmp_path):
    assert _error(tmp_path / "nope", "training") == f"dataset folder {tmp_path / 'nope'} does not exist"


def test_missing_datalist_says_how_to_create_one(tmp_path):
    assert _error(tmp_path, "training") == (
        f"no datalist.json in the dataset folder {tmp_path}; create one with "
        f"`python -m bundle.prepare glas --source SRC --output {tmp_path} --split 10` or write it by hand"
    )


def test_invalid_json_gives_line_and_column(tmp_path):
    path = _write(tmp_path, '{\n    "training": [\n        {"image": "a.png",}\n    ]\n}\n')
    assert _error(tmp_path, "training") == (
        f"{path} is not valid JSON: Expecting property name enclosed in double quotes at line 3 column 27"
    )


def test_datalist_that_is_not_an_object(tmp_path):
    path = _write(tmp_path, "[1, 2]")
    message = f"{path} must hold a JSON object with lists such as 'training', got a list"
    assert _error(tmp_path, "training") == message


def test_missing_key(tmp_path):
    path = _write(tmp_path, {"dataset": "x", "validation": [], "unlabeled": []})
    assert _error(tmp_path, "training") == f"{path} has no 'training' list (lists present: 'validation', 'unlabeled')"


def test_missing_unlabeled_key_is_empty_when_allowed(tmp_path):
    path = _write(tmp_path, {"training": []})
    assert load_datalist(tmp_path, "unlabeled", allow_empty=True) == []
    assert load_datalist(tmp_path, "training", allow_empty=True) == []
    assert _error(tmp_path, "unlabeled") == f"{path} has no 'unlabeled' list (lists present: 'training')"


def test_key_that_is_not_a_list(tmp_path):
    path = _write(tmp_path, {"training": {"image": "a.png"}})
    assert _error(tmp_path, "training") == f"'training' in {path} must be a list of items, got a dict"


def test_empty_list(tmp_path):
    path = _write(tmp_path, {"training": []})
    assert _error(tmp_path, "training") == f"the 'training' list in {path} is empty"


def test_item_that_is_not_an_object(tmp_path):
    path = _write(tmp_path, {"unlabeled": ["a.png"]})
    assert (
        _error(tmp_path, "unlabeled")
        == f"item 0 of 'unlabeled' in {path} must be an object with an 'image' path, got 'a.png'"
    )


def test_item_without_image(tmp_path):
    _touch(tmp_path / "a.png")
    path = _write(tmp_path, {"unlabeled": [{"image": "a.png"}, {"name": "b"}]})
    assert _error(tmp_path, "unlabeled") == f"item 1 of 'unlabeled' in {path} has no 'image' path"


@pytest.mark.parametrize("key", ["training", "validation", "test"])
def test_labelled_item_without_label(tmp_path, key):
    _touch(tmp_path / "a.png")
    path = _write(tmp_path, {key: [{"image": "a.png"}]})
    assert _error(tmp_path, key) == f"item 0 of {key!r} in {path} has no 'label' path"


def test_unlabeled_items_need_no_label(tmp_path):
    _touch(tmp_path / "a.png")
    _write(tmp_path, {"unlabeled": [{"image": "a.png"}]})
    assert load_datalist(tmp_path, "unlabeled") == [{"image": str(tmp_path / "a.png")}]


def test_path_that_is_not_a_string(tmp_path):
    path = _write(tmp_path, {"training": [{"image": 3, "label": "m.png"}]})
    assert (
        _error(tmp_path, "training")
        == f"item 0 of 'training' in {path}: 'image' must be a non-empty path string, got 3"
    )


def test_missing_file_names_item_and_path(tmp_path):
    _touch(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png", tmp_path / "images" / "b.png")
    items = [{"image": "images/a.png", "label": "masks/a.png"}, {"image": "images/b.png", "label": "masks/b.png"}]
    path = _write(tmp_path, {"validation": items})
    assert _error(tmp_path, "validation") == (
        f"item 1 of 'validation' in {path}: label {tmp_path / 'masks' / 'b.png'} does not exist"
    )
    # without the check the paths are only resolved
    loaded = load_datalist(tmp_path, "validation", check_files=False)
    assert loaded[1]["label"] == str(tmp_path / "masks" / "b.png")


def test_write_datalist_is_indented_and_replaces_atomically(tmp_path):
    target = tmp_path / DATALIST_FILENAME
    target.write_text("old")
    returned = write_datalist({"training": [{"image": "a.png"}]}, target)
    assert returned == str(target)
    assert target.read_text() == '{\n    "training": [\n        {\n            "image": "a.png"\n        }\n    ]\n}\n'
    assert os.listdir(tmp_path) == [DATALIST_FILENAME]  # no temporary file left


# --- ensure_dataset ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_synthetic(monkeypatch):
    """Make ensure_dataset generate a 6-image synthetic set (names syn_000..syn_005), to keep tests fast."""
    small = functools.partial(
        bundle.prepare.synthetic.generate_synthetic_dataset,
        num_labeled=2,
        num_unlabeled=2,
        num_validation=1,
        num_test=1,
    )
    monkeypatch.setattr(bundle.prepare.synthetic, "generate_synthetic_dataset", small)


def test_default_location_gets_the_synthetic_dataset(tmp_path, monkeypatch, caplog):
    (tmp_path / "bundle").mkdir()
    monkeypatch.chdir(tmp_path / "bundle")
    default = tmp_path / "bundle" / "data" / "synthetic"  # does not exist yet
    with caplog.at_level(logging.INFO, logger="bundle.prepare.synthetic"):
        returned = ensure_dataset("data/synthetic", default)  # relative spelling of the same folder
    assert returned == str(default)
    messages = [record.getMessage() for record in caplog.records if record.name == "bundle.prepare.synthetic"]
    assert len(messages) == 1 and "generating the embedded synthetic dataset there" in messages[0]
    assert str(default) in messages[0]
    assert len(load_datalist(default, "training")) == 8
    assert len(load_datalist(default, "unlabeled")) == 24

    # a second call changes nothing
    stamps = {path: path.stat().st_mtime_ns for path in default.rglob("*")}
    caplog.clear()
    assert ensure_dataset(default, default) == str(default)
    assert {path: path.stat().st_mtime_ns for path in default.rglob("*")} == stamps
    assert not caplog.records


def test_existing_datalist_at_the_default_location_is_kept(tmp_path):
    _touch(tmp_path / "a.png", tmp_path / "m.png")
    path = _write(tmp_path, {"training": [{"image": "a.png", "label": "m.png"}]})
    before = path.read_bytes()
    assert ensure_dataset(tmp_path, tmp_path) == str(tmp_path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.png", DATALIST_FILENAME, "m.png"]


def test_other_locations_are_never_generated(tmp_path):
    other = tmp_path / "my-data"
    other.mkdir()
    assert ensure_dataset(other, tmp_path / "default") == str(other)
    assert os.listdir(other) == []
    assert not (tmp_path / "default").exists()
    assert ensure_dataset(tmp_path / "missing", tmp_path / "default") == str(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(BundleInputError, match="no datalist.json in the dataset folder"):
        load_datalist(other, "training")


def test_symlinked_default_location_counts_as_the_default(tmp_path, small_synthetic):
    real = tmp_path / "real"
    real.mkdir()  # exists but is empty
    (tmp_path / "link").symlink_to(real)
    assert ensure_dataset(tmp_path / "link", real) == str(tmp_path / "link")
    assert (real / DATALIST_FILENAME).is_file()


def test_interrupted_generation_is_redone(tmp_path, small_synthetic):
    default = tmp_path / "default"
    ensure_dataset(default, default)
    expected = (default / "images" / "syn_005.png").read_bytes()
    # simulate a run killed before its datalist was written: no datalist, a truncated image
    (default / DATALIST_FILENAME).unlink()
    (default / "images" / "syn_005.png").write_bytes(expected[:100])
    ensure_dataset(default, default)
    assert (default / "images" / "syn_005.png").read_bytes() == expected
    assert len(load_datalist(default, "test")) == 1


def test_default_location_that_is_a_file(tmp_path):
    target = tmp_path / "data"
    target.write_text("x")
    with pytest.raises(BundleInputError) as error:
        ensure_dataset(target, target)
    assert str(error.value) == f"default dataset folder {target} exists but is not a folder"


def test_require_label_can_be_relaxed_for_inference_lists(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    _write(tmp_path, {"test": [{"image": "a.png"}]})
    with pytest.raises(BundleInputError, match="has no 'label' path"):
        load_datalist(tmp_path, "test")
    assert load_datalist(tmp_path, "test", require_label=False) == [{"image": str(image)}]


def test_unlabeled_pool_from_a_datalist_or_a_folder_of_images(tmp_path):
    """A datalist's 'unlabeled' list wins; a folder without one is a pool of the images directly in it."""
    studies = tmp_path / "studies"
    _touch(studies / "b.png", studies / "a.TIF", studies / "c.jpg", studies / "notes.txt")
    _touch(studies / "labels" / "final" / "a.png")  # MONAI Label's labels: not images of the pool
    (studies / "folder.png").mkdir()
    assert unlabeled_pool(studies) == [{"image": str(studies / name)} for name in ("a.TIF", "b.png", "c.jpg")]

    _write(tmp_path / "listed", {"unlabeled": [{"image": "x.png"}]})
    _touch(tmp_path / "listed" / "x.png", tmp_path / "listed" / "y.png")
    assert unlabeled_pool(tmp_path / "listed") == [{"image": str(tmp_path / "listed" / "x.png")}]
    _write(tmp_path / "no_list", {"training": []})
    _touch(tmp_path / "no_list" / "y.png")
    assert unlabeled_pool(tmp_path / "no_list") == []  # a datalist without 'unlabeled': no pool
    assert unlabeled_pool(tmp_path / "missing") == [] and unlabeled_pool(tmp_path / "listed" / "labels") == []
