"""KPIs 2024 preparation (``python -m bundle.prepare kpi``): tiling of the 2048x2048 training patches, binarised
JPEG masks, seeded labelled split, folder or slide-level validation/test, and an untouched source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import (
    KPI_DISEASES,
    KPI_TRAINING,
    KPI_UNMASKED,
    read_datalist,
    run_cli,
    snapshot,
    write_kpi,
    write_kpi_patch,
)
from PIL import Image

from bundle.errors import BundleInputError
from bundle.prepare.kpi import find_kpi_patches, prepare_kpi, tile_origins

LISTS = ("training", "validation", "unlabeled", "test")


@pytest.fixture(scope="module")
def kpi_source(tmp_path_factory):
    return write_kpi(tmp_path_factory.mktemp("kpi_source"))


@pytest.fixture(scope="module")
def prepared(kpi_source, tmp_path_factory):
    """The fixture prepared with 32-pixel tiles (each 64x64 patch gives 4 tiles), 50 % labelled."""
    out = tmp_path_factory.mktemp("kpi_prepared") / "out"
    before = snapshot(kpi_source)
    datalist = prepare_kpi(kpi_source, out, labeled_percent=50, tile_size=32)
    return {"out": out, "datalist": datalist, "before": before}


def _binary_jpeg(path: str) -> np.ndarray:
    return np.where(np.asarray(Image.open(path).convert("L")) > 127, 255, 0).astype(np.uint8)


def test_tile_origins_cover_the_side_with_full_tiles():
    assert tile_origins(2048, 512) == [0, 512, 1024, 1536]
    assert tile_origins(600, 256) == [0, 256, 344]
    assert tile_origins(512, 512) == [0]
    assert tile_origins(100, 512) == [0]


def test_lists_counts_parts_and_files(prepared, kpi_source):
    datalist = prepared["datalist"]
    # 9 training slides x 2 patches = 18 patches (one without a mask): 9 labelled (8.5), 9 unlabelled; 4 tiles each
    assert {key: len(datalist[key]) for key in LISTS} == {"training": 36, "validation": 8, "unlabeled": 36, "test": 8}
    assert {item["part"] for key in LISTS for item in datalist[key]} == set(KPI_DISEASES)
    assert datalist["tile_size"] == 32 and datalist == read_datalist(prepared["out"])
    settings = json.loads((prepared["out"] / "dataset.json").read_text())
    assert settings["dataset_dir"] == str(prepared["out"]) and settings["class_names"] == ["background", "glomerulus"]
    assert "glomerul" in settings["class_descriptions"][1] and settings["min_object_area"] == 500
    out = prepared["out"]
    for item in datalist["training"]:
        assert item["image"].startswith(str(out / "tiles" / "images")) and os.path.isfile(item["image"])
        assert item["label"] == item["image"].replace(str(out / "tiles" / "images"), str(out / "tiles" / "masks"))
    assert all("label" not in item for item in datalist["unlabeled"])
    for key in ("validation", "test"):
        for item in datalist[key]:
            assert item["image"].startswith(str(kpi_source)) and item["image"].endswith("_img.jpg")
            assert item["label"].startswith(str(out / "masks" / key))
            mask_jpeg = item["image"].replace(f"{os.sep}img{os.sep}", f"{os.sep}mask{os.sep}")
            assert np.array_equal(np.asarray(Image.open(item["label"])), _binary_jpeg(mask_jpeg[:-8] + "_mask.jpg"))
    unmasked_tiles = [item for item in datalist["unlabeled"] if item["name"].startswith(KPI_UNMASKED.split("/")[-1])]
    assert len(unmasked_tiles) == 4
    assert not list(out.glob(".prepare-*"))


def test_labelled_tiles_come_from_whole_patches(prepared):
    patches = {}
    for key, labelled in (("training", True), ("unlabeled", False)):
        for item in prepared["datalist"][key]:
            patches.setdefault(item["name"].rsplit("_y", 1)[0], set()).add(labelled)
    assert all(len(kinds) == 1 for kinds in patches.values())
    assert len(patches) == 18


def test_source_is_left_untouched(prepared, kpi_source):
    assert snapshot(kpi_source) == prepared["before"]


def test_tiles_of_a_2048_patch_cover_it_and_match_its_mask(tmp_path):
    source = tmp_path / "source"
    slide = source / KPI_TRAINING / "NEP25" / "08_373_01"
    write_kpi_patch(slide, "NEP25_08_373_01_4096_14336", (2048, 2048), seed=3)
    write_kpi_patch(source / "validation" / "NEP25" / "08_374", "NEP25_08_374_0_0", (64, 64), seed=4)
    datalist = prepare_kpi(source, tmp_path / "out", labeled_percent=100, test_fraction=0)
    tiles = datalist["training"]
    assert len(tiles) == 16 and datalist["unlabeled"] == []
    image = np.asarray(Image.open(slide / "img" / "NEP25_08_373_01_4096_14336_img.jpg"))
    mask_jpeg = slide / "mask" / "NEP25_08_373_01_4096_14336_mask.jpg"
    assert len(np.unique(np.asarray(Image.open(mask_jpeg)))) > 2  # JPEG noise around 0 and 255
    mask = _binary_jpeg(str(mask_jpeg))
    assert np.count_nonzero(mask)
    mosaic_image, mosaic_mask = np.zeros_like(image), np.zeros_like(mask)
    covered = np.zeros(mask.shape, dtype=int)
    for item in tiles:
        y, x = (int(part[1:]) for part in item["name"].rsplit("_", 2)[-2:])
        tile_image, tile_mask = np.asarray(Image.open(item["image"])), np.asarray(Image.open(item["label"]))
        assert tile_image.shape == (512, 512, 3) and tile_mask.shape == (512, 512)
        mosaic_image[y : y + 512, x : x + 512] = tile_image
        mosaic_mask[y : y + 512, x : x + 512] = tile_mask
        covered[y : y + 512, x : x + 512] += 1
    assert (covered == 1).all()
    assert np.array_equal(mosaic_image, image) and np.array_equal(mosaic_mask, mask)
    assert set(np.unique(mosaic_mask).tolist()) == {0, 255}


def test_overlapping_last_tiles_when_the_side_is_not_a_multiple(tmp_path):
    source = tmp_path / "source"
    write_kpi_patch(source / "train" / "DN" / "11_363", "DN_11_363_0_0", (600, 520), seed=5)
    write_kpi_patch(source / "validation" / "DN" / "11_364", "DN_11_364_0_0", (64, 64), seed=6)
    tiles = prepare_kpi(source, tmp_path / "out", labeled_percent=100, tile_size=256, test_fraction=0)["training"]
    origins = sorted(tuple(int(part[1:]) for part in item["name"].rsplit("_", 2)[-2:]) for item in tiles)
    assert origins == [(y, x) for y in (0, 256, 344) for x in (0, 256, 264)]
    image = np.asarray(Image.open(source / "train" / "DN" / "11_363" / "img" / "DN_11_363_0_0_img.jpg"))
    mask = _binary_jpeg(str(source / "train" / "DN" / "11_363" / "mask" / "DN_11_363_0_0_mask.jpg"))
    for item in tiles:
        y, x = (int(part[1:]) for part in item["name"].rsplit("_", 2)[-2:])
        assert np.array_equal(np.asarray(Image.open(item["image"])), image[y : y + 256, x : x + 256])
        assert np.array_equal(np.asarray(Image.open(item["label"])), mask[y : y + 256, x : x + 256])


def test_same_seed_same_datalist_other_seed_other_split(kpi_source, tmp_path, capsys):
    outputs = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        args = ["kpi", "--source", kpi_source, "--output", tmp_path / run, "--labeled-percent", 50, "--seed", seed]
        code, out, err = run_cli(capsys, *args, "--tile-size", 64)
        assert code == 0, err
        outputs[run] = json.loads((tmp_path / run / "datalist.json").read_text())
    assert out.splitlines()[1] == "training: 9 images (56Nx 2, DN 3, NEP25 2, normal 2)"

    def relative(datalist: dict) -> dict:
        return {key: [item["name"] for item in datalist[key]] for key in LISTS}

    assert relative(outputs["a"]) == relative(outputs["b"])
    assert relative(outputs["a"])["training"] != relative(outputs["c"])["training"]


def test_without_validation_and_test_folders_whole_slides_are_held_out(tmp_path):
    source = write_kpi(tmp_path / "source", size=32, test=False)
    validation_folder = next(source.glob("*Validation*"))
    validation_folder.rename(tmp_path / "elsewhere")
    datalist = prepare_kpi(source, tmp_path / "out", labeled_percent=100, val_fraction=0.25, test_fraction=0.25)
    slides = {key: {item["image"].split(os.sep)[-3] for item in datalist[key]} for key in ("validation", "test")}
    training_slides = {item["image"].split(os.sep)[-2] for key in ("training", "unlabeled") for item in datalist[key]}
    assert len(slides["validation"]) == len(slides["test"]) == 2  # 9 slides (8 fully masked): round(0.25 * 8)
    assert not (slides["validation"] & slides["test"]) and not (
        training_slides & (slides["validation"] | slides["test"])
    )
    assert all(f"{os.sep}train{os.sep}" in item["image"] for item in datalist["validation"] + datalist["test"])
    assert all(item["label"].startswith(str(tmp_path / "out" / "masks" / "train")) for item in datalist["test"])


def test_rerun_with_force_replaces_the_old_tiles(kpi_source, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["kpi", "--source", kpi_source, "--output", out, "--labeled-percent", 50]
    assert run_cli(capsys, *args, "--tile-size", 32)[0] == 0
    old_tile = Path(next(item["image"] for item in read_datalist(out)["training"] if item["name"].endswith("_y32_x32")))
    code, _, err = run_cli(capsys, *args, "--tile-size", 64)
    assert code == 2 and err == f"error: {out / 'datalist.json'} already exists; pass --force to overwrite it\n"
    assert old_tile.is_file()
    assert run_cli(capsys, *args, "--tile-size", 64, "--force")[0] == 0
    assert not old_tile.exists() and len(read_datalist(out)["training"]) == 9


def test_output_inside_the_source_is_refused(kpi_source, capsys):
    before = snapshot(kpi_source)
    code, out, err = run_cli(
        capsys, "kpi", "--source", kpi_source, "--output", kpi_source / "prepared", "--labeled-percent", 50
    )
    assert code == 2 and out == ""
    assert err.startswith(f"error: output {kpi_source / 'prepared'} overlaps the KPI source {kpi_source}; ")
    assert snapshot(kpi_source) == before


def test_a_failed_run_leaves_no_output(tmp_path):
    source = tmp_path / "source"
    write_kpi_patch(source / "train" / "DN" / "a", "DN_a_0_0", (64, 64), seed=1)
    write_kpi_patch(source / "validation" / "DN" / "b", "DN_b_0_0", (64, 64), seed=2)
    (source / "validation" / "DN" / "b" / "mask" / "DN_b_0_0_mask.jpg").unlink()
    with pytest.raises(BundleInputError, match=r"^no mask for validation image .*DN_b_0_0_img\.jpg: expected "):
        prepare_kpi(source, tmp_path / "out", labeled_percent=100, test_fraction=0)
    assert not (tmp_path / "out").exists()  # the training tiles were staged, then removed with the new folder
    (tmp_path / "kept").mkdir()
    with pytest.raises(BundleInputError, match=r"^no mask for validation image "):
        prepare_kpi(source, tmp_path / "kept", labeled_percent=100, test_fraction=0)
    assert os.listdir(tmp_path / "kept") == []


def test_layout_errors(tmp_path):
    with pytest.raises(BundleInputError, match=r"^no KPI train folder found in .* \(searched 4 levels\): expected"):
        find_kpi_patches(tmp_path)
    write_kpi_patch(tmp_path / "a" / "train" / "DN" / "s", "DN_s_0_0", (32, 32), seed=1)
    write_kpi_patch(tmp_path / "b" / "train" / "DN" / "s", "DN_s_0_0", (32, 32), seed=1)
    with pytest.raises(BundleInputError, match=r"^two KPI train folders in .*: .*a.train and .*b.train; keep only one"):
        find_kpi_patches(tmp_path)


def test_grayscale_and_palette_patches_are_tiled_and_reported(tmp_path, capsys):
    source = tmp_path / "source"
    write_kpi_patch(source / "train" / "DN" / "a", "DN_a_0_0", (64, 64), seed=1)
    write_kpi_patch(source / "train" / "DN" / "b", "DN_b_0_0", (64, 64), seed=2)
    write_kpi_patch(source / "validation" / "DN" / "c", "DN_c_0_0", (64, 64), seed=3)
    grey = source / "train" / "DN" / "a" / "img" / "DN_a_0_0_img.jpg"
    Image.open(grey).convert("L").save(grey)
    palette = source / "train" / "DN" / "b" / "img" / "DN_b_0_0_img.png"
    (source / "train" / "DN" / "b" / "img" / "DN_b_0_0_img.jpg").unlink()
    Image.fromarray(np.asarray(Image.open(grey))).convert("P").save(palette)
    args = ["kpi", "--source", source, "--output", tmp_path / "out", "--labeled-percent", 50, "--test-fraction", 0]
    code, _, err = run_cli(capsys, *args, "--tile-size", 32)
    assert code == 0, err
    assert err.splitlines() == [
        f"notice: no KPI test folder in {source} and --test-fraction is 0: the test list is empty",
        f"notice: 2 of 3 images are not RGB (1 grayscale, 1 palette or other); they are converted to RGB when loaded "
        f"(transparency on white): {grey} (L), {palette} (P)",
    ]
    tiles = {
        item["name"]: item["image"]
        for key in ("training", "unlabeled")
        for item in read_datalist(tmp_path / "out")[key]
    }
    assert Image.open(tiles["DN_a_0_0_y0_x0"]).mode == "L" and Image.open(tiles["DN_b_0_0_y0_x0"]).mode == "RGB"
