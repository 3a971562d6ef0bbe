"""Bad input never surprises: every preparer reports each kind of broken input at preparation time as one clear
``BundleInputError`` naming the file (an ``error:`` line and exit status 2 on the command line), accepts grayscale
and RGBA images with one notice line, and never writes into the source."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from dataset_fixtures import (
    KPI_TRAINING,
    KPI_VALIDATION,
    MONUSEG_TRAINING,
    monuseg_name,
    run_cli,
    snapshot,
    tissue,
    write_ebhi,
    write_folders,
    write_kpi,
    write_kpi_patch,
    write_monuseg,
)
from PIL import Image

from bundle.errors import BundleInputError
from bundle.prepare.ebhi import build_ebhi_datalist
from bundle.prepare.folders import build_folders_datalist
from bundle.prepare.kpi import prepare_kpi
from bundle.prepare.monuseg import prepare_monuseg

SMALL_EBHI = {"Adenocarcinoma": 6}
CANNOT_READ = "cannot be read (corrupt, truncated or not an image: "


def _ebhi(tmp_path: Path) -> Path:
    return write_ebhi(tmp_path / "source", counts=SMALL_EBHI) / "Adenocarcinoma"


def _folders(tmp_path: Path) -> Path:
    return write_folders(tmp_path / "source", labelled=6, unlabelled=1)


def _prepare_folders(source: Path, **options) -> dict:
    return build_folders_datalist(source / "images", source / "masks", **options)


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


@pytest.mark.parametrize(
    "command, label",
    [
        (["glas", "--source", "{missing}", "--split", "10"], "GlaS"),
        (["ebhi-gland", "--source", "{missing}", "--labeled-percent", "10"], "EBHI-Seg"),
        (["ebhi-cancer", "--source", "{missing}", "--labeled-percent", "10"], "EBHI-Seg"),
        (["kpi", "--source", "{missing}", "--labeled-percent", "10"], "KPI"),
        (["monuseg", "--source", "{missing}", "--labeled-percent", "10"], "MoNuSeg"),
        (["folders", "--images", "{missing}", "--masks", "{missing}"], "images"),
    ],
)
def test_missing_source_folder_is_one_error_line(tmp_path, capsys, command, label):
    missing = tmp_path / "no-such-folder"
    args = [part.format(missing=missing) for part in command] + ["--output", str(tmp_path / "out")]
    code, out, err = run_cli(capsys, *args)
    assert (code, out) == (2, "")
    assert err == f"error: {label} source {missing} does not exist\n"
    assert not (tmp_path / "out").exists()


def test_missing_label_folder_is_named(tmp_path):
    folder = _ebhi(tmp_path)
    for label in (folder / "label").iterdir():
        label.unlink()
    (folder / "label").rmdir()
    with pytest.raises(BundleInputError, match=r"^EBHI-Seg class folder .*Adenocarcinoma has no label/ folder$"):
        build_ebhi_datalist(folder.parent, "cancer", labeled_percent=50)


def test_missing_file_behind_a_link_is_named(tmp_path):
    source = _folders(tmp_path)
    link = source / "images" / "case_20.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(BundleInputError) as error:
        _prepare_folders(source)
    assert str(error.value) == f"{link} is a link to a missing file"


def test_missing_mask_of_a_validation_patch_is_named(tmp_path):
    source = write_kpi(tmp_path / "source", size=32, test=False)
    mask = _first(_first(source / KPI_VALIDATION / "DN") / "mask")
    mask.unlink()
    image = mask.parent.parent / "img" / mask.name.replace("_mask", "_img")
    with pytest.raises(BundleInputError) as error:
        prepare_kpi(source, tmp_path / "out", labeled_percent=50, test_fraction=0)
    assert str(error.value) == f"no mask for validation image {image}: expected {str(mask)[:-4]}.jpg"


def test_empty_image_file_is_named(tmp_path):
    folder = _ebhi(tmp_path)
    image = _first(folder / "image")
    image.write_bytes(b"")
    with pytest.raises(BundleInputError) as error:
        build_ebhi_datalist(folder.parent, "cancer", labeled_percent=50)
    assert str(error.value) == f"image {image} is empty (0 bytes)"


def test_empty_mask_file_is_named(tmp_path):
    source = write_kpi(tmp_path / "source", size=32)
    mask = _first(_first(source / KPI_TRAINING / "NEP25") / "mask")
    mask.write_bytes(b"")
    with pytest.raises(BundleInputError) as error:
        prepare_kpi(source, tmp_path / "out", labeled_percent=50)
    assert str(error.value) == f"mask {mask} is empty (0 bytes)"


def test_truncated_jpeg_image_is_named(tmp_path):
    source = write_kpi(tmp_path / "source", size=64)
    image = _first(_first(source / KPI_TRAINING / "56Nx") / "img")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image, quality=95)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(BundleInputError) as error:
        prepare_kpi(source, tmp_path / "out", labeled_percent=50)
    assert str(error.value).startswith(f"image {image} {CANNOT_READ}")
    assert "\n" not in str(error.value)


def test_truncated_tiff_image_is_named(tmp_path):
    training, _ = write_monuseg(tmp_path / "source", train=6, test=0)
    image = training / "Tissue Images" / f"{monuseg_name(3)}.tif"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(BundleInputError) as error:
        prepare_monuseg(training, tmp_path / "out", labeled_percent=50)
    assert str(error.value).startswith(f"image {image} {CANNOT_READ}failed to read 4800 bytes, got ")


def test_non_image_file_with_an_image_suffix_is_named(tmp_path):
    source = _folders(tmp_path)
    fake = source / "images" / "case_02.png"
    fake.write_text("this is not a PNG file")
    with pytest.raises(BundleInputError) as error:
        _prepare_folders(source)
    assert str(error.value) == f"image {fake} {CANNOT_READ}not a recognised image format)"


def test_mask_size_differing_from_its_image_is_named(tmp_path):
    folder = _ebhi(tmp_path)
    label = _first(folder / "label")
    Image.new("L", (32, 30)).save(label)
    with pytest.raises(BundleInputError) as error:
        build_ebhi_datalist(folder.parent, "cancer", labeled_percent=50)
    assert str(error.value) == (
        f"mask {label} has size 32x30 but its image {folder / 'image' / label.name} has size 32x32"
    )


def test_unexpected_values_in_a_binary_mask_are_listed(tmp_path):
    source = _folders(tmp_path)
    mask = source / "masks" / "case_04.png"
    values = np.zeros((24, 24), dtype=np.uint8)
    values[0, :3] = [3, 255, 255]
    Image.fromarray(values).save(mask)
    with pytest.raises(BundleInputError) as error:
        _prepare_folders(source)
    assert str(error.value) == (
        f"mask {mask} has values {{0, 3, 255}}; a binary mask may hold only 0 and 255 (or 0 and 1)"
    )


def test_grey_label_with_nothing_above_the_threshold_is_refused(tmp_path):
    folder = _ebhi(tmp_path)
    label = _first(folder / "label")
    values = np.zeros((32, 32), dtype=np.uint8)
    values[4:20, 4:20] = 1  # a 0/1 label would be all background at > 127
    Image.fromarray(values).save(label)
    with pytest.raises(BundleInputError) as error:
        build_ebhi_datalist(folder.parent, "cancer", labeled_percent=50)
    assert str(error.value) == (
        f"mask {label} has values {{0, 1}}, none above 127: it would be all background; expected a grey 0/255 mask "
        "whose foreground is > 127"
    )


def test_colour_label_is_refused(tmp_path):
    folder = _ebhi(tmp_path)
    label = _first(folder / "label")
    colour = np.zeros((32, 32, 3), dtype=np.uint8)
    colour[2:9, 2:9] = [255, 0, 0]
    Image.fromarray(colour).save(label)
    with pytest.raises(BundleInputError, match=r"^mask .* is a colour image whose red, green and blue values differ"):
        build_ebhi_datalist(folder.parent, "cancer", labeled_percent=50)


def test_grayscale_and_rgba_images_are_accepted_with_one_notice(tmp_path, capsys):
    source = _folders(tmp_path)
    grey, rgba = source / "images" / "case_01.png", source / "images" / "case_05.png"
    Image.new("L", (24, 24), 128).save(grey)
    Image.fromarray(np.dstack([tissue((24, 24), 5), np.full((24, 24), 200, np.uint8)])).save(rgba)
    Image.fromarray(tissue((24, 24), 6)[..., 0]).save(source / "images" / "case_06.png")
    Image.new("LA", (24, 24)).save(source / "images" / "case_03.png")
    before = snapshot(source)
    args = ["folders", "--images", source / "images", "--masks", source / "masks", "--output", tmp_path / "out"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and out.startswith("wrote ")
    assert err.splitlines() == [
        f"notice: 4 of 7 images are not RGB (2 grayscale, 2 with transparency (RGBA)); they are converted to RGB when "
        f"loaded (transparency on white): {grey} (L), {source / 'images' / 'case_03.png'} (LA), {rgba} (RGBA) and "
        "1 more"
    ]
    assert snapshot(source) == before


def test_too_small_labeled_percentage_is_explained(tmp_path, capsys):
    folder = _ebhi(tmp_path)
    before = snapshot(tmp_path / "source")
    args = ["ebhi-cancer", "--source", tmp_path / "source", "--output", tmp_path / "out", "--labeled-percent", 5]
    code, out, err = run_cli(capsys, *args)
    assert (code, out) == (2, "")
    # 6 labelled images: 1 validation, 1 test (1.2), 5 % of the other 4 rounds to 0
    assert err == (
        "error: --labeled-percent 5 of the 4 training EBHI-Seg cancer images with a mask gives no labelled image; "
        "use at least 12.5\n"
    )
    assert not (tmp_path / "out").exists() and snapshot(tmp_path / "source") == before
    assert folder.is_dir()


def test_no_masks_at_all_is_explained(tmp_path):
    source = _folders(tmp_path)
    for mask in (source / "masks").iterdir():
        mask.unlink()
    with pytest.raises(BundleInputError) as error:
        _prepare_folders(source)
    assert str(error.value) == "none of the 7 images has a mask, so none can be labelled"


def test_two_images_with_the_same_name_are_named(tmp_path):
    source = _folders(tmp_path)
    Image.fromarray(tissue((24, 24), 1)).save(source / "images" / "case_01.jpg")
    with pytest.raises(BundleInputError) as error:
        _prepare_folders(source)
    assert str(error.value) == (
        f"two files for case_01 in {source / 'images'}: {source / 'images' / 'case_01.jpg'} and "
        f"{source / 'images' / 'case_01.png'}; keep only one"
    )


def test_two_masks_matching_one_image_are_named(tmp_path, capsys):
    source = _folders(tmp_path)
    tifffile.imwrite(source / "masks" / "case_02.tif", np.zeros((24, 24), dtype=np.uint8))
    args = ["folders", "--images", source / "images", "--masks", source / "masks", "--output", tmp_path / "out"]
    code, out, err = run_cli(capsys, *args)
    assert (code, out) == (2, "")
    assert err == (
        f"error: two files for case_02 in {source / 'masks'}: {source / 'masks' / 'case_02.png'} and "
        f"{source / 'masks' / 'case_02.tif'}; keep only one\n"
    )


def test_same_name_in_the_unlabelled_folder_is_named(tmp_path):
    source = _folders(tmp_path)
    (tmp_path / "more").mkdir()
    Image.fromarray(tissue((24, 24), 1)).save(tmp_path / "more" / "case_03.jpg")
    with pytest.raises(BundleInputError) as error:
        _prepare_folders(source, unlabeled=tmp_path / "more")
    assert str(error.value) == (
        f"two images named case_03: {source / 'images' / 'case_03.png'} and {tmp_path / 'more' / 'case_03.jpg'}; "
        "keep only one"
    )


def test_bad_input_leaves_the_source_unchanged_and_writes_no_output(tmp_path, capsys):
    training, _ = write_monuseg(tmp_path / "source", train=6, test=0)
    annotation = training / "Annotations" / f"{monuseg_name(2)}.xml"
    annotation.write_text("<Annotations><Annotation><Regions><Region")
    before = snapshot(tmp_path / "source")
    code, out, err = run_cli(
        capsys, "monuseg", "--source", training, "--output", tmp_path / "out", "--labeled-percent", 50
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"error: annotation {annotation} is not valid XML: ") and err.count("\n") == 1
    assert snapshot(tmp_path / "source") == before
    assert not (tmp_path / "out").exists()
    assert not any(name.startswith(".prepare-") for name in os.listdir(tmp_path))
    assert MONUSEG_TRAINING in str(training)


def test_same_kpi_patch_in_two_splits_is_named(tmp_path):
    source = tmp_path / "source"
    write_kpi_patch(source / "train" / "DN" / "11_363", "DN_11_363_0_0", (32, 32), seed=1)
    write_kpi_patch(source / "validation" / "DN" / "11_363", "DN_11_363_0_0", (32, 32), seed=1)
    with pytest.raises(BundleInputError) as error:
        prepare_kpi(source, tmp_path / "out", labeled_percent=100, test_fraction=0)
    assert str(error.value) == (
        f"patch DN_11_363_0_0 of slide 11_363 is in two splits: {source / 'train/DN/11_363/img/DN_11_363_0_0_img.jpg'} "
        f"and {source / 'validation/DN/11_363/img/DN_11_363_0_0_img.jpg'}; keep only one"
    )


@pytest.mark.parametrize("inside", ["images", "masks", "images/prepared"])
def test_output_inside_a_source_folder_is_refused(tmp_path, capsys, inside):
    """Even a datalist-only preparer never writes into a source folder (nor the folder itself)."""
    source = write_folders(tmp_path / "source", labelled=4, unlabelled=1)
    before = snapshot(source)
    output = source / inside
    args = ["folders", "--images", source / "images", "--masks", source / "masks", "--output", output]
    code, out, err = run_cli(capsys, *args)
    folder = "images" if inside.startswith("images") else "masks"
    assert (code, out) == (2, "")
    assert err == (
        f"error: output {output} overlaps the input source {source / folder}; choose an output folder outside the "
        "source (files are written there and the source is never modified)\n"
    )
    assert snapshot(source) == before


def test_empty_weights_and_checkpoint_files_say_so(tmp_path):
    import torch

    from bundle.engine.checkpoint import TrainingCheckpointLoader
    from bundle.inference import load_network_weights

    empty = tmp_path / "model.pt"
    empty.write_bytes(b"")
    with pytest.raises(BundleInputError) as error:
        load_network_weights(torch.nn.Linear(2, 2), str(empty))
    assert str(error.value) == f"model weights file {empty} is empty (0 bytes): an interrupted copy or download?"
    truncated = tmp_path / "truncated.pt"
    torch.save({"weight": torch.zeros(2, 2)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(BundleInputError) as error:
        load_network_weights(torch.nn.Linear(2, 2), str(truncated))
    detail = str(error.value).removeprefix(f"cannot read model weights file {truncated}: ")
    assert detail != str(error.value) and len(detail.split("(")[0].strip()) > 0  # a reason, not an empty detail
    with pytest.raises(BundleInputError) as error:
        TrainingCheckpointLoader(str(empty), {"network": torch.nn.Linear(2, 2)})._read(torch.device("cpu"))
    assert str(error.value) == f"resume: checkpoint {empty} is empty (0 bytes)"


def test_png_with_a_bad_checksum_but_intact_pixels_is_accepted_and_a_truncated_png_is_not(tmp_path):
    import struct

    from bundle.prepare.checks import inspect_image

    pixels = np.random.RandomState(0).randint(0, 255, (40, 40, 3), dtype=np.uint8)
    good = tmp_path / "good.png"
    Image.fromarray(pixels).save(good)
    data = bytearray(good.read_bytes())
    start = data.find(b"IDAT")
    data[start + 4 + struct.unpack(">I", data[start - 4 : start])[0]] ^= 0xFF  # the IDAT chunk's CRC
    bad_crc = tmp_path / "bad_crc.png"
    bad_crc.write_bytes(bytes(data))
    assert inspect_image(str(bad_crc)).size == (40, 40)
    assert np.array_equal(np.asarray(Image.open(bad_crc).convert("RGB")), pixels)  # what training reads
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(data) // 2])
    with pytest.raises(BundleInputError) as error:
        inspect_image(str(truncated))
    assert str(error.value).startswith(f"image {truncated} {CANNOT_READ}")
