"""Tests of GlaS preparation (``python -m bundle.prepare glas``): the literature split on the real GlaS copy, the
official Warwick layout on small fake copies, and the one-line errors for broken inputs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import run_python
from PIL import Image

from bundle.errors import BundleInputError
from bundle.prepare import main
from bundle.prepare.glas import build_glas_datalist, find_glas_cases

TRAIN = [f"train_{i}" for i in range(1, 86)]
TEST = [f"testA_{i}" for i in range(1, 61)] + [f"testB_{i}" for i in range(1, 21)]
ALL_NAMES = TRAIN + TEST
# the split of the semi-supervised GlaS literature, written out by hand
VALIDATION = [
    "train_7",
    "train_27",
    "train_33",
    "train_37",
    "train_45",
    "train_54",
    "train_62",
    "train_63",
    "train_66",
    "train_71",
    "train_76",
    "train_82",
]
LABELLED_10 = ["train_4", "train_17", "train_23", "train_28", "train_60", "train_74", "train_85"]
LABELLED_20 = [
    "train_4",
    "train_9",
    "train_17",
    "train_20",
    "train_23",
    "train_28",
    "train_42",
    "train_52",
    "train_55",
    "train_60",
    "train_69",
    "train_70",
    "train_74",
    "train_85",
]
OFFICIAL_FOLDER = "Warwick QU Dataset (Released 2016_07_08)"


def _names(items: list[dict]) -> list[str]:
    return [item["name"] for item in items]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    entries = {".": (0, folder.stat().st_mtime_ns)}
    for path in folder.rglob("*"):
        stat = path.stat()
        entries[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return entries


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def prepared(glas_dir, tmp_path_factory):
    """The real GlaS copy prepared for the 10, 20 and 100 % splits (plus source listings before and after)."""
    out = tmp_path_factory.mktemp("glas_prepared")
    before = _snapshot(glas_dir)
    datalists = {}
    for split in (10, 20, 100):
        target = out / f"split{split}"
        assert main(["glas", "--source", str(glas_dir), "--output", str(target), "--split", str(split)]) == 0
        datalists[split] = json.loads((target / "datalist.json").read_text())
    return {"out": out, "datalists": datalists, "before": before, "after": _snapshot(glas_dir)}


@pytest.mark.parametrize(
    ("split", "counts"),
    [
        (10, {"training": 7, "validation": 12, "unlabeled": 66, "test": 80}),
        (20, {"training": 14, "validation": 12, "unlabeled": 59, "test": 80}),
        (100, {"training": 73, "validation": 12, "unlabeled": 0, "test": 80}),
    ],
)
def test_real_glas_split_counts(prepared, split, counts):
    datalist = prepared["datalists"][split]
    assert {key: len(datalist[key]) for key in counts} == counts
    parts = [item["part"] for item in datalist["test"]]
    assert parts.count("testA") == 60 and parts.count("testB") == 20


def test_real_glas_split_membership_and_natural_order(prepared):
    datalists = prepared["datalists"]
    for split in (10, 20, 100):
        assert _names(datalists[split]["validation"]) == VALIDATION
        assert _names(datalists[split]["test"]) == TEST
    assert _names(datalists[10]["training"]) == LABELLED_10
    assert _names(datalists[20]["training"]) == LABELLED_20
    assert _names(datalists[10]["unlabeled"]) == [n for n in TRAIN if n not in VALIDATION + LABELLED_10]
    assert _names(datalists[20]["unlabeled"]) == [n for n in TRAIN if n not in VALIDATION + LABELLED_20]
    assert _names(datalists[100]["training"]) == [n for n in TRAIN if n not in VALIDATION]
    assert datalists[100]["unlabeled"] == []


def test_real_glas_items_and_metadata(prepared, glas_dir):
    glas_dir = Path(os.path.abspath(glas_dir))
    datalist = prepared["datalists"][10]
    assert {key: datalist[key] for key in ("dataset", "split", "source")} == {
        "dataset": "glas",
        "split": 10,
        "source": str(glas_dir),
    }
    # the settings training needs travel in dataset.json, merged after configs/train.json
    assert json.loads((prepared["out"] / "split10" / "dataset.json").read_text()) == {
        "dataset_dir": str(prepared["out"] / "split10"),
        "num_classes": 2,
        "class_names": ["background", "gland"],
    }
    assert datalist["training"][0] == {
        "image": str(glas_dir / "images" / "train_4.png"),
        "label": str(glas_dir / "masks" / "train_4.png"),
        "label_type": "binary",
        "name": "train_4",
        "part": "train",
    }
    assert datalist["unlabeled"][0] == {
        "image": str(glas_dir / "images" / "train_1.png"),
        "name": "train_1",
        "part": "train",
    }
    for split, content in prepared["datalists"].items():
        for key in ("training", "validation", "unlabeled", "test"):
            for item in content[key]:
                assert os.path.isabs(item["image"]) and os.path.isfile(item["image"]), (split, item)
                if key == "unlabeled":
                    assert "label" not in item
                else:
                    assert os.path.isfile(item["label"]) and item["label_type"] == "binary"
                    assert os.path.basename(item["label"]) == os.path.basename(item["image"])


def test_real_glas_datalist_file_is_indented_json(prepared):
    text = (prepared["out"] / "split10" / "datalist.json").read_text()
    assert text.startswith('{\n    "dataset": "glas",\n    "split": 10,\n')
    assert text.endswith("}\n")


def test_real_glas_source_is_left_untouched(prepared):
    assert prepared["after"] == prepared["before"]
    assert "datalist.json" not in prepared["after"]


def test_existing_datalist_is_kept_unless_forced(prepared, glas_dir, capsys):
    target = prepared["out"] / "split20"
    before = (target / "datalist.json").read_bytes()
    args = ["glas", "--source", str(glas_dir), "--output", str(target), "--split", "10"]
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == ""
    assert err == f"error: {target / 'datalist.json'} already exists; pass --force to overwrite it\n"
    assert (target / "datalist.json").read_bytes() == before

    code, out, err = _run(capsys, *args, "--force")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"wrote {target / 'datalist.json'} and {target / 'dataset.json'}; train with --config_file "
        f"\"['configs/train.json','{target / 'dataset.json'}']\"",
        "training: 7 images",
        "validation: 12 images",
        "unlabeled: 66 images",
        "test: 80 images (testA 60, testB 20)",
    ]
    assert json.loads((target / "datalist.json").read_text())["split"] == 10


def _subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "bundle.prepare", *args], cwd, timeout=120)


def test_command_line_from_another_working_directory(glas_dir, tmp_path):
    source = os.path.abspath(glas_dir)
    result = _subprocess(tmp_path, "glas", "--source", source, "--output", "out", "--split", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "training: 14 images",
        "validation: 12 images",
        "unlabeled: 59 images",
        "test: 80 images (testA 60, testB 20)",
    ]
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert _names(datalist["training"]) == LABELLED_20


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "no-such-glas"
    result = _subprocess(tmp_path, "glas", "--source", str(missing), "--output", "out", "--split", "10")
    assert result.returncode == 2
    assert result.stderr == f"error: GlaS source {missing} does not exist\n"
    assert not (tmp_path / "out").exists()


def test_unknown_split_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["glas", "--source", str(tmp_path), "--output", str(tmp_path / "out"), "--split", "30"])
    assert stop.value.code == 2
    assert "invalid choice: 30" in capsys.readouterr().err


# --- small fake copies ---------------------------------------------------------------------------------------------


def _write_png_copy(root: Path, names: list[str] = ALL_NAMES, size: tuple[int, int] = (8, 6)) -> Path:
    """A tiny copy in this project's layout: images/<name>.png (RGB) and masks/<name>.png (0/255)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = Image.fromarray(np.full((size[1], size[0], 3), 200, dtype=np.uint8))
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[1:4, 2:5] = 255
    for name in names:
        image.save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def _write_official_copy(
    image_dir: Path, mask_dir: Path | None = None, names: list[str] = ALL_NAMES, size: tuple[int, int] = (8, 8)
) -> None:
    """A tiny copy in the official naming: <name>.bmp (RGB) and <name>_anno.bmp with gland ids 0, 1, 2, 3."""
    mask_dir = mask_dir or image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.full((size[1], size[0], 3), 180, dtype=np.uint8))
    ids = np.zeros((size[1], size[0]), dtype=np.uint8)
    ids[0:2, 0:2], ids[3:5, 3:5], ids[6:8, 0:3] = 1, 2, 3
    for name in names:
        image.save(image_dir / f"{name}.bmp")
        Image.fromarray(ids).save(mask_dir / f"{name}_anno.bmp")


def test_official_release_in_a_nested_folder(tmp_path, capsys):
    source = tmp_path / "warwick"
    _write_official_copy(source / OFFICIAL_FOLDER)
    (source / OFFICIAL_FOLDER / "Grade.csv").write_text("name,patient ID, grade (GlaS)\n")
    before = _snapshot(source)
    code, out, err = _run(capsys, "glas", "--source", str(source), "--output", str(tmp_path / "out"), "--split", "20")
    assert code == 0, err
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert {key: len(datalist[key]) for key in ("training", "validation", "unlabeled", "test")} == {
        "training": 14,
        "validation": 12,
        "unlabeled": 59,
        "test": 80,
    }
    assert datalist["source"] == str(source)
    data = source / OFFICIAL_FOLDER
    assert datalist["training"][0] == {
        "image": str(data / "train_4.bmp"),
        "label": str(data / "train_4_anno.bmp"),
        "instance_label": str(data / "train_4_anno.bmp"),
        "label_type": "instance",
        "name": "train_4",
        "part": "train",
    }
    assert datalist["test"][-1]["image"] == str(data / "testB_20.bmp")
    assert all(item["label_type"] == "instance" for item in datalist["validation"] + datalist["test"])
    assert datalist["unlabeled"][0] == {"image": str(data / "train_1.bmp"), "name": "train_1", "part": "train"}
    assert _snapshot(source) == before


def test_official_names_in_images_and_masks_folders(tmp_path):
    _write_official_copy(tmp_path / "src" / "images", tmp_path / "src" / "masks")
    datalist = build_glas_datalist(tmp_path / "src", 100)
    assert len(datalist["training"]) == 73 and datalist["unlabeled"] == []
    item = datalist["validation"][0]
    assert item["name"] == "train_7"
    assert item["label"] == item["instance_label"] == str(tmp_path / "src" / "masks" / "train_7_anno.bmp")


def test_layout_detection_reports_the_data_folder(tmp_path):
    _write_official_copy(tmp_path / "src" / OFFICIAL_FOLDER, names=["train_3", "train_10", "testB_2", "testA_11"])
    root, cases = find_glas_cases(tmp_path / "src")
    assert root == str(tmp_path / "src" / OFFICIAL_FOLDER)
    assert [case.name for case in cases] == ["train_3", "train_10", "testA_11", "testB_2"]
    assert [case.label_type for case in cases] == ["instance"] * 4


def test_missing_split_image_is_named(tmp_path, capsys):
    source = tmp_path / "src"
    _write_official_copy(source, names=[name for name in ALL_NAMES if name != "train_17"])
    code, out, err = _run(capsys, "glas", "--source", str(source), "--output", str(tmp_path / "out"), "--split", "10")
    assert code == 2 and out == ""
    assert err.startswith(f"error: GlaS source {source} has no image train_17, needed as a labelled (10 % split) image")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_validation_image_is_named(tmp_path):
    _write_png_copy(tmp_path / "src", names=[name for name in ALL_NAMES if name != "train_82"])
    with pytest.raises(BundleInputError, match=r"has no image train_82, needed as a validation image"):
        build_glas_datalist(tmp_path / "src", 100)


def test_source_without_glas_images(tmp_path):
    (tmp_path / "src" / "other").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("x")
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(tmp_path / "src", 10)
    assert str(error.value).startswith(f"no GlaS images found in {tmp_path / 'src'}: expected images/<name>.png")


def test_two_candidate_folders_are_ambiguous(tmp_path):
    _write_official_copy(tmp_path / "src" / "a", names=["train_1"])
    _write_official_copy(tmp_path / "src" / "b", names=["train_1"])
    with pytest.raises(BundleInputError, match=r"GlaS images found in several folders of .*src"):
        find_glas_cases(tmp_path / "src")


def test_mask_size_mismatch_names_both_files(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    Image.fromarray(np.zeros((6, 9), dtype=np.uint8)).save(source / "masks" / "train_4.png")
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(source, 10)
    assert str(error.value) == (
        f"mask {source / 'masks' / 'train_4.png'} has size 9x6 but its image {source / 'images' / 'train_4.png'} "
        "has size 8x6"
    )


def test_unexpected_binary_mask_values_are_named(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    values = np.zeros((6, 8), dtype=np.uint8)
    values[0, :3] = [128, 255, 7]
    Image.fromarray(values).save(source / "masks" / "train_7.png")
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(source, 20)
    assert str(error.value) == (
        f"mask {source / 'masks' / 'train_7.png'} has values {{0, 7, 128, 255}}; "
        "a binary mask may hold only 0 and 255 (or 0 and 1)"
    )


def test_zero_one_binary_masks_are_accepted(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    values = np.zeros((6, 8), dtype=np.uint8)
    values[2:4, 2:4] = 1
    Image.fromarray(values).save(source / "masks" / "train_4.png")
    assert build_glas_datalist(source, 10)["training"][0]["label_type"] == "binary"


def test_colour_instance_mask_is_refused(tmp_path):
    _write_official_copy(tmp_path / "src")
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "testA_3_anno.bmp")
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(tmp_path / "src", 10)
    assert str(error.value) == (
        f"mask {tmp_path / 'src' / 'testA_3_anno.bmp'} has RGB pixels; expected a single-channel label image"
    )


def test_truncated_image_is_named(tmp_path):
    source = _write_png_copy(tmp_path / "src", size=(64, 48))
    path = source / "images" / "testB_3.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(source, 10)
    message = str(error.value)
    assert message.startswith(f"image {path} cannot be read (corrupt, truncated or not an image: ")
    assert "\n" not in message


def test_grey_image_is_refused(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    Image.new("L", (8, 6)).save(source / "images" / "train_60.png")
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(source, 10)
    assert str(error.value) == f"image {source / 'images' / 'train_60.png'} has L pixels; expected an RGB image"


def test_missing_mask_is_named(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    (source / "masks" / "testA_5.png").unlink()
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(source, 10)
    assert str(error.value).startswith(
        f"no mask for image {source / 'images' / 'testA_5.png'}: found no {source / 'masks' / 'testA_5'} or "
        f"{source / 'masks' / 'testA_5_anno'} (with extension .png/"
    )


def test_mask_of_an_unlabelled_image_is_needed_only_when_it_is_labelled(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    (source / "masks" / "train_1.png").unlink()
    datalist = build_glas_datalist(source, 10)
    assert datalist["unlabeled"][0] == {
        "image": str(source / "images" / "train_1.png"),
        "name": "train_1",
        "part": "train",
    }
    with pytest.raises(BundleInputError, match=r"^no mask for image .*train_1\.png"):
        build_glas_datalist(source, 100)


def test_output_inside_the_source_is_refused(tmp_path, capsys):
    """Nothing is ever written into the source, not even a new datalist next to the data."""
    source = _write_png_copy(tmp_path / "src")
    for output in (source, source / "masks"):
        code, _, err = _run(
            capsys, "glas", "--source", str(source), "--output", str(output), "--split", "10", "--force"
        )
        assert code == 2
        assert err == (
            f"error: output {output} overlaps the GlaS source {source}; choose an output folder outside the source "
            "(files are written there and the source is never modified)\n"
        )
        assert not (output / "datalist.json").exists() and not (output / "dataset.json").exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    source = _write_png_copy(tmp_path / "src")
    (tmp_path / "out").write_text("x")
    code, _, err = _run(capsys, "glas", "--source", str(source), "--output", str(tmp_path / "out"), "--split", "10")
    assert code == 2
    assert err == f"error: output {tmp_path / 'out'} exists and is not a folder\n"


def test_corrupt_mask_is_named(tmp_path):
    source = _write_png_copy(tmp_path / "src")
    path = source / "masks" / "testB_20.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(BundleInputError) as error:
        build_glas_datalist(source, 10)
    assert str(error.value).startswith(f"mask {path} cannot be read (corrupt, truncated or not an image: ")


def test_corrupted_pixel_data_is_detected(tmp_path):
    source = _write_png_copy(tmp_path / "src", size=(64, 48))
    path = source / "images" / "train_85.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the compressed pixels
    path.write_bytes(bytes(data))
    with pytest.raises(BundleInputError, match=r"^image .*train_85\.png cannot be read \(corrupt, truncated"):
        build_glas_datalist(source, 10)
