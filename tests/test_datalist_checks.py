"""A hand-written datalist gets the checks prepared data gets, once, when training or evaluation loads it
(``load_datalist(..., checks=...)``, ``bundle.data.checks``): mask sizes, image sizes the training rescale can
handle, duplicate images within and across lists, and the mask classes against ``num_classes``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import REPO_ROOT, run_python
from monai.bundle import ConfigParser
from monai.transforms import Zoom
from PIL import Image

from bundle.data.checks import DatalistChecks, min_image_size
from bundle.data.datalist import DATALIST_FILENAME, load_datalist, unlabeled_pool
from bundle.errors import BundleInputError

# what configs/train.json passes (@datalist_checks)
CHECKS = DatalistChecks(num_classes=2, mask_mode="nonzero", mask_threshold=127, image_scale=0.5)


def _image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """An RGB image of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if path.suffix == ".tif":
        tifffile.imwrite(path, pixels, photometric="rgb")
    else:
        Image.fromarray(pixels).save(path)
    return path


def _mask(path: Path, size: tuple[int, int], values=(0, 255), dtype=np.uint8) -> Path:
    """A mask of ``size`` = (width, height): the left part ``values[0]``, stripes of the others on the right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0]), values[0], dtype=dtype)
    for index, value in enumerate(values[1:]):
        pixels[:, size[0] // 2 + index :: len(values) - 1] = value
    if path.suffix == ".tif":
        tifffile.imwrite(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    return path


def _case(folder: Path, name: str, size=(40, 30), mask_size=None, values=(0, 255)) -> dict[str, str]:
    """An image and its mask under ``folder`` (``images/NAME.png``, ``masks/NAME.png``); relative paths."""
    _image(folder / "images" / f"{name}.png", size, seed=len(name))
    _mask(folder / "masks" / f"{name}.png", mask_size or size, values)
    return {"image": f"images/{name}.png", "label": f"masks/{name}.png"}


def _datalist(folder: Path, **lists) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATALIST_FILENAME
    path.write_text(json.dumps(lists, indent=4))
    return path


def _error(folder: Path, key: str, checks=CHECKS) -> str:
    with pytest.raises(BundleInputError) as error:
        load_datalist(folder, key, checks=checks)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_valid_hand_written_datalist_passes_unchanged(tmp_path):
    """PNG and TIFF, 0/255, 0/1 and instance-id masks, relative and absolute paths, an image in both 'validation'
    and 'test' (allowed: neither is trained on), tiny validation images (the validation inferer keeps 1 pixel)."""
    data = tmp_path / "data"
    tiff = {"image": str(_image(data / "t.tif", (33, 21))), "label": str(_mask(data / "t_mask.tif", (33, 21)))}
    instance = {**_case(data, "instance", size=(20, 20)), "label": "masks/instance16.png"}
    _mask(data / "masks" / "instance16.png", (20, 20), values=(0, 300, 70), dtype=np.uint16)  # 16-bit object ids
    training = [
        _case(data, "a"),
        _case(data, "b", values=(0, 1)),
        tiff,
        instance,
        _case(data, "smallest", size=(2, 2)),
    ]
    shared = _case(data, "shared")
    validation = [shared, _case(data, "dot", size=(1, 1), values=(0,))]
    test = [shared, {**_case(data, "c"), "instance_label": "masks/c.png"}]
    unlabeled = [{"image": "images/u.png"}]
    _image(data / "images" / "u.png", (2, 9))
    _datalist(data, training=training, validation=validation, test=test, unlabeled=unlabeled)
    for key in ("training", "validation", "test"):
        assert load_datalist(data, key, checks=CHECKS) == load_datalist(data, key)
    assert unlabeled_pool(data, checks=CHECKS) == unlabeled_pool(data)
    # a threshold mask: the grey values above 127 are class 1
    _datalist(data, training=[_case(data, "grey", values=(3, 200))])
    threshold = DatalistChecks(num_classes=2, mask_mode="threshold", mask_threshold=127, image_scale=0.5)
    assert len(load_datalist(data, "training", checks=threshold)) == 1


def test_a_mask_whose_size_differs_from_its_image_names_both_files_and_sizes(tmp_path):
    data = tmp_path / "data"
    path = _datalist(data, training=[_case(data, "a"), _case(data, "b", size=(40, 30), mask_size=(30, 40))])
    assert _error(data, "training") == (
        f"item 1 of 'training' in {path}: mask {data / 'masks' / 'b.png'} has size 30x40 but its image "
        f"{data / 'images' / 'b.png'} has size 40x30"
    )
    # validation and the instance masks of a test list too
    _datalist(data, training=[_case(data, "a")], validation=[_case(data, "b", mask_size=(40, 31))])
    assert "mask " + str(data / "masks" / "b.png") + " has size 40x31 but its image" in _error(data, "validation")
    _mask(data / "masks" / "wide.png", (41, 30))
    _datalist(data, test=[{**_case(data, "c"), "instance_label": "masks/wide.png"}])
    assert _error(data, "test").endswith(
        f"instance mask {data / 'masks' / 'wide.png'} has size 41x30 but its image {data / 'images' / 'c.png'} "
        "has size 40x30"
    )


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_an_image_too_small_for_the_training_rescale_names_file_size_and_minimum(tmp_path, size):
    data = tmp_path / "data"
    path = _datalist(data, training=[_case(data, "a"), _case(data, "tiny", size=size)])
    width, height = size
    assert _error(data, "training") == (
        f"item 1 of 'training' in {path}: image {data / 'images' / 'tiny.png'} has size {width}x{height}, below the "
        "minimum of 2x2 pixels (image_scale 0.5 shrinks a side under 2 pixels to 0)"
    )
    # the minimum follows image_scale; without a downscale every size works
    assert _error(data, "training", DatalistChecks(num_classes=2, image_scale=0.25)).endswith(
        "below the minimum of 4x4 pixels (image_scale 0.25 shrinks a side under 4 pixels to 0)"
    )
    assert len(load_datalist(data, "training", checks=DatalistChecks(num_classes=2, image_scale=1.0))) == 2


def test_unlabelled_images_too_small_for_the_training_rescale_are_refused(tmp_path):
    pool = tmp_path / "pool"
    _image(pool / "a.png", (40, 30))
    _image(pool / "b.png", (1, 1))
    with pytest.raises(BundleInputError) as error:
        unlabeled_pool(pool, checks=CHECKS)
    assert str(error.value) == (
        f"item 1 of 'unlabeled' in the folder {pool}: image {pool / 'b.png'} has size 1x1, below the minimum of 2x2 "
        "pixels (image_scale 0.5 shrinks a side under 2 pixels to 0)"
    )


@pytest.mark.parametrize("scale", [0.5, 0.3, 0.25, 0.1, 0.7, 1.0, 1.5])
def test_the_minimum_size_is_the_smallest_side_monai_zoom_keeps(scale):
    """``min_image_size`` against the transform itself: train.json's rescale (Zoom, keep_size=False)."""
    least = min_image_size(scale)
    zoom = Zoom(zoom=scale, keep_size=False, mode="area")
    assert tuple(zoom(torch.zeros(1, least, 7 + least)).shape[1:]) == (
        math.floor(least * scale),
        math.floor((7 + least) * scale),
    )
    assert math.floor(least * scale) >= 1
    if least > 1:
        assert zoom(torch.zeros(1, least - 1, 8)).shape[1] == 0  # an image of 0 rows (the label's zoom raises)


def test_an_image_that_cannot_be_read_is_named(tmp_path):
    data = tmp_path / "data"
    case = _case(data, "a")
    (data / "images" / "a.png").write_bytes(b"not an image")
    path = _datalist(data, training=[case])
    message = _error(data, "training")
    assert message.startswith(f"item 0 of 'training' in {path}: image {data / 'images' / 'a.png'} cannot be read: ")


def test_an_image_listed_twice_in_a_list_is_refused(tmp_path):
    data = tmp_path / "data"
    a, b = _case(data, "a"), _case(data, "b")
    path = _datalist(data, training=[a, b, {**a, "image": str(data / "images" / "a.png")}])
    assert _error(data, "training") == (
        f"image {data / 'images' / 'a.png'} is listed twice in 'training' of {path} (items 0 and 2); list each "
        "image once"
    )


@pytest.mark.parametrize("other", ["validation", "test"])
def test_an_image_in_training_and_in_validation_or_test_is_refused(tmp_path, other):
    data = tmp_path / "data"
    a, b = _case(data, "a"), _case(data, "b")
    path = _datalist(data, **{"training": [a, b], other: [_case(data, "c"), b]})
    image = data / "images" / "b.png"
    assert _error(data, "training") == (
        f"image {image} is in both 'training' (item 1) and {other!r} (item 1) of {path}; an image trained on must "
        "not be validated or tested on, remove it from one list"
    )
    assert _error(data, other) == (
        f"image {image} is in both {other!r} (item 1) and 'training' (item 1) of {path}; an image trained on must "
        "not be validated or tested on, remove it from one list"
    )


def test_num_classes_larger_than_the_classes_of_the_masks_is_refused(tmp_path):
    data = tmp_path / "data"
    path = _datalist(data, training=[_case(data, "a"), _case(data, "b")], validation=[_case(data, "c")])
    three = DatalistChecks(num_classes=3, mask_mode="nonzero", mask_threshold=127, image_scale=0.5)
    assert _error(data, "training", three) == (
        f"the masks of 'training' in {path} hold the classes {{0, 1}} but num_classes is 3: no training mask has "
        "class 2; num_classes (with class_names and class_descriptions) must match the classes of the masks "
        "(mask_mode 'nonzero' makes every value > 0 class 1; the masks hold the values {0, 255})"
    )
    # masks with values 0, 1, 2 are still two classes in mask_mode 'nonzero': the message says why
    _datalist(data, training=[_case(data, "multi", values=(0, 1, 2))])
    assert _error(data, "training", three).endswith(
        "(mask_mode 'nonzero' makes every value > 0 class 1; the masks hold the values {0, 1, 2})"
    )
    four = DatalistChecks(num_classes=4, image_scale=0.5)
    assert "hold the classes {0, 1} but num_classes is 4: no training mask has classes 2, 3;" in _error(
        data, "training", four
    )
    # all-background training masks leave class 1 unlearnt
    _datalist(data, training=[_case(data, "empty", values=(0,))])
    assert "hold the classes {0} but num_classes is 2: no training mask has class 1;" in _error(data, "training")


def test_a_mask_value_whose_class_is_not_below_num_classes_is_refused(tmp_path):
    data = tmp_path / "data"
    path = _datalist(
        data, training=[_case(data, "a", values=(0, 128)), _case(data, "b", values=(0, 128, 255))], validation=[]
    )
    values = DatalistChecks(num_classes=2, mask_mode="values", class_values=[0, 128, 255], image_scale=0.5)
    assert _error(data, "training", values) == (
        f"item 1 of 'training' in {path}: mask {data / 'masks' / 'b.png'} has class 2 (mask values {{255}}) but "
        "num_classes is 2, so the classes are 0 to 1; mask_mode 'values' makes the values 0, 128, 255 the classes "
        "0, 1, ..."
    )
    # a value that is no class at all is named as MaskToClassd names it
    _datalist(data, validation=[_case(data, "c", values=(0, 7))])
    assert _error(data, "validation", values) == (
        f"item 0 of 'validation' in {path}: mask {data / 'masks' / 'c.png'} has 1 unexpected value(s) 7 (600 "
        "pixels); class_values are 0, 128, 255"
    )


def test_train_and_evaluate_configs_pass_their_options_to_the_checks():
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "evaluate.json")])
    parser["image_scale"] = 0.25
    parser["mask_mode"] = "threshold"
    assert parser.get_parsed_content("datalist_checks") == DatalistChecks(
        num_classes=2, mask_mode="threshold", mask_threshold=127, image_scale=0.25
    )
    for node in ("train#dataset#data", "validate#dataset#data", "train#unlabeled#datalist", "test#dataset#data"):
        assert parser[f"{node}#checks"] == "@datalist_checks", node


@pytest.mark.parametrize("case", ["mask_size", "num_classes"])
def test_training_stops_with_one_error_line(tmp_path, case):
    """``python -m monai.bundle run training`` on a bad hand-written datalist: one ``error:`` line, no traceback,
    before any iteration."""
    data = tmp_path / "data"
    bad = _case(data, "b", mask_size=(30, 40)) if case == "mask_size" else _case(data, "b")
    _datalist(data, training=[_case(data, "a"), bad], validation=[_case(data, "c")], unlabeled=[])
    options = ["--num_classes", "3", "--class_names", "['bg','gland','other']"] if case == "num_classes" else []
    options += ["--class_descriptions", "['bg','gland','other']"] if case == "num_classes" else []
    files = "['" + "','".join(str(REPO_ROOT / "configs" / name) for name in ("train.json", "tiny.json")) + "']"
    args = ["-m", "monai.bundle", "run", "training", "--config_file", files, "--bundle_root", str(REPO_ROOT)]
    args += ["--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "m")]
    args += ["--patch_size", "[64,64]", "--device", "cpu", "--max_epochs", "1", "--epoch_length", "1"]
    done = run_python(args + options, tmp_path, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if case == "mask_size":
        expected = f"mask {data / 'masks' / 'b.png'} has size 30x40 but its image {data / 'images' / 'b.png'} has "
        assert len(errors) == 1 and expected in errors[0] and errors[0].endswith("size 40x30"), done.stderr[-3000:]
    else:
        assert errors == [
            f"error: the masks of 'training' in {data / DATALIST_FILENAME} hold the classes {{0, 1}} but num_classes "
            "is 3: no training mask has class 2; num_classes (with class_names and class_descriptions) must match the "
            "classes of the masks (mask_mode 'nonzero' makes every value > 0 class 1; the masks hold the values "
            "{0, 255})"
        ], done.stderr[-3000:]
    assert not (tmp_path / "m" / "model.pt").exists()
