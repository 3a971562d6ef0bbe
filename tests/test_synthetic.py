"""Tests of the embedded synthetic dataset: determinism, layout, mask/image alignment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.data.datalist import load_datalist
from bundle.errors import BundleInputError
from bundle.prepare.synthetic import generate_synthetic_dataset, render_synthetic_case

SMALL = {"num_labeled": 2, "num_unlabeled": 2, "num_validation": 1, "num_test": 1}


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "default"
    returned = generate_synthetic_dataset(out)
    assert returned == str(out)
    return out


def test_default_set_layout_and_counts(default_set):
    out = default_set
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["dataset"] == "synthetic"
    assert datalist["num_classes"] == 2
    assert datalist["class_names"] == ["background", "gland"]
    counts = {key: len(datalist[key]) for key in ("training", "unlabeled", "validation", "test")}
    assert counts == {"training": 8, "unlabeled": 24, "validation": 4, "test": 4}
    assert datalist["training"][0] == {"image": "images/syn_000.png", "label": "masks/syn_000.png", "name": "syn_000"}
    assert datalist["unlabeled"][0] == {"image": "images/syn_008.png", "name": "syn_008"}
    assert datalist["test"][-1]["name"] == "syn_039"
    assert all("label" not in item for item in datalist["unlabeled"])
    # masks only for the images that are labelled; no temporary files left behind
    assert sorted(os.listdir(out / "images")) == [f"syn_{i:03d}.png" for i in range(40)]
    assert sorted(os.listdir(out / "masks")) == [f"syn_{i:03d}.png" for i in list(range(8)) + list(range(32, 40))]
    assert sorted(os.listdir(out)) == ["datalist.json", "images", "masks"]


def test_default_set_loads_as_a_datalist(default_set):
    out = default_set
    training = load_datalist(out, "training")
    unlabeled = load_datalist(out, "unlabeled")
    assert [item["image"] for item in training][:2] == [
        str(out / "images/syn_000.png"),
        str(out / "images/syn_001.png"),
    ]
    assert training[0]["label"] == str(out / "masks/syn_000.png")
    assert len(unlabeled) == 24 and all("label" not in item for item in unlabeled)
    assert len(load_datalist(out, "validation")) == 4 and len(load_datalist(out, "test")) == 4


def test_masks_are_binary_and_aligned_with_glands(default_set):
    out = default_set
    datalist = json.loads((out / "datalist.json").read_text())
    labelled = datalist["training"] + datalist["validation"] + datalist["test"]
    for item in labelled:
        image = Image.open(out / item["image"])
        mask = Image.open(out / item["label"])
        assert image.mode == "RGB" and mask.mode == "L"
        assert image.size == mask.size == (256, 256)
        pixels = np.asarray(image).astype(float)
        gland = np.asarray(mask) == 255
        assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}
        assert 0.03 < gland.mean() < 0.6
        # glands (hematoxylin-dense epithelium) are much less red than eosin stroma and hold most dark nuclei
        assert pixels[gland][:, 0].mean() < pixels[~gland][:, 0].mean() - 25
        dark = pixels.mean(axis=2) < 110
        assert dark[gland].mean() > 4 * dark[~gland].mean()


def test_images_vary_in_stain_and_content(default_set):
    out = default_set
    means = np.array(
        [np.asarray(Image.open(out / "images" / f"syn_{i:03d}.png")).reshape(-1, 3).mean(0) for i in range(40)]
    )
    gland_fractions = [
        (np.asarray(Image.open(out / "masks" / f"syn_{i:03d}.png")) > 0).mean() for i in list(range(8)) + [32, 33]
    ]
    assert means.std(axis=0).min() > 3.0  # stain colour / brightness differs between images
    assert max(gland_fractions) - min(gland_fractions) > 0.1  # gland density differs between images


def test_generation_is_deterministic(tmp_path, default_set):
    first = generate_synthetic_dataset(tmp_path / "a", seed=0, **SMALL)
    second = generate_synthetic_dataset(tmp_path / "b", seed=0, **SMALL)
    first_files, second_files = _file_bytes(Path(first)), _file_bytes(Path(second))
    assert sorted(first_files) == [
        "datalist.json",
        "images/syn_000.png",
        "images/syn_001.png",
        "images/syn_002.png",
        "images/syn_003.png",
        "images/syn_004.png",
        "images/syn_005.png",
        "masks/syn_000.png",
        "masks/syn_001.png",
        "masks/syn_004.png",
        "masks/syn_005.png",
    ]
    assert first_files == second_files
    # each image depends only on (seed, index): the small set starts with the default set's images
    default_out = default_set
    assert first_files["images/syn_001.png"] == (default_out / "images/syn_001.png").read_bytes()
    assert first_files["masks/syn_000.png"] == (default_out / "masks/syn_000.png").read_bytes()


def test_another_seed_gives_other_images(tmp_path):
    image_0, mask_0 = render_synthetic_case(0, 0)
    image_1, mask_1 = render_synthetic_case(1, 0)
    assert image_0.shape == image_1.shape == (256, 256, 3) and image_0.dtype == np.uint8
    assert mask_0.shape == (256, 256) and mask_0.dtype == np.uint8
    assert np.abs(image_0.astype(int) - image_1.astype(int)).mean() > 10
    assert (mask_0 != mask_1).mean() > 0.05


def test_other_image_size(tmp_path):
    out = generate_synthetic_dataset(
        tmp_path, image_size=96, num_labeled=1, num_unlabeled=0, num_validation=1, num_test=0
    )
    datalist = json.loads(Path(out, "datalist.json").read_text())
    assert datalist["unlabeled"] == [] and datalist["test"] == []
    assert Image.open(Path(out, "images/syn_000.png")).size == (96, 96)
    assert Image.open(Path(out, "masks/syn_001.png")).size == (96, 96)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_labeled": 0}, "synthetic dataset option num_labeled must be at least 1, got 0"),
        ({"num_test": -1}, "synthetic dataset option num_test must be a non-negative integer, got -1"),
        ({"num_unlabeled": 2.5}, "synthetic dataset option num_unlabeled must be a non-negative integer, got 2.5"),
        ({"image_size": 16}, "synthetic dataset option image_size must be an integer of at least 32, got 16"),
    ],
)
def test_bad_options_are_reported(tmp_path, options, message):
    with pytest.raises(BundleInputError) as error:
        generate_synthetic_dataset(tmp_path / "out", **options)
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_reported(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(BundleInputError) as error:
        generate_synthetic_dataset(target, **SMALL)
    assert str(error.value) == f"cannot write the synthetic dataset to {target}: it exists and is not a folder"
