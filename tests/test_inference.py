"""configs/inference.json as users run it: every input type, exact size and orientation of the masks, the tiled path
for large TIFFs, probability maps, and one clear line for each bad input.

Alignment is checked with a network that thresholds the red channel pixel by pixel (a 1x1 convolution loaded from
a checkpoint like trained weights): the written mask must equal ``red > 127.5`` of the input, pixel for pixel, for
every format and on both the whole-image and the tiled path. The real TransUNet (tiny) runs on real GlaS images.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import REPO_ROOT, TINY_NETWORK, run_python
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from bundle.errors import BundleInputError, find_input_error, install_excepthook
from bundle.inference import LabelOutputd, OutputFolderLayout, TiledTiffWriter, filter_by_size, inference_inputs

INFERENCE_JSON = str(REPO_ROOT / "configs" / "inference.json")
TRAIN_JSON = str(REPO_ROOT / "configs" / "train.json")

# a network that predicts "foreground" where the red value is above 127.5 (after the config's normalisation)
RED_NETWORK = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 2, "kernel_size": 1}
RED_LEVEL = 127.5
LARGE_SHAPE = (3000, 4000)  # height, width


def red_network_state() -> dict[str, torch.Tensor]:
    cut = (RED_LEVEL / 255.0 - 0.485) / 0.229
    weight = torch.zeros(2, 3, 1, 1)
    weight[1, 0] = 10.0
    return {"weight": weight, "bias": torch.tensor([0.0, -10.0 * cut])}


def expected_mask(rgb: np.ndarray) -> np.ndarray:
    return np.where(rgb[..., 0] > RED_LEVEL, 255, 0).astype(np.uint8)


def pattern(height: int, width: int, seed: int, block: int = 4) -> np.ndarray:
    """RGB uint8 with random blocks whose red is 0..100 or 160..255 (never near the cut), asymmetric by nature."""
    rng = np.random.default_rng(seed)
    cells = (-(-height // block), -(-width // block))
    high = rng.random(cells) < 0.5
    red = np.where(high, rng.integers(160, 256, cells), rng.integers(0, 101, cells)).astype(np.uint8)
    red = np.repeat(np.repeat(red, block, 0), block, 1)[:height, :width]
    other = rng.integers(0, 256, (height, width, 2), dtype=np.uint8)
    return np.concatenate([red[..., None], other], axis=-1)


def decoded_rgb(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, glas_dir) -> Path:
    """2 real GlaS images (links), a JPEG, a BMP, a small TIFF and an odd-sized PNG."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in ("testA_1.png", "train_2.png"):
        (folder / name).symlink_to(glas_dir / "images" / name)
    # JPEG with a quality that keeps the blocks' red far from the cut after compression
    Image.fromarray(pattern(120, 200, 1, block=16)).save(folder / "photo.jpg", quality=95)
    Image.fromarray(pattern(90, 70, 2)).save(folder / "scan.bmp")
    tifffile.imwrite(folder / "small.tif", pattern(140, 96, 3), photometric="rgb")
    Image.fromarray(pattern(257, 301, 4)).save(folder / "odd.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def large_tiff(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("large") / "slide.tif"
    tifffile.imwrite(path, pattern(*LARGE_SHAPE, 5, block=8), photometric="rgb", tile=(256, 256))
    return path


@pytest.fixture(scope="module")
def red_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("red") / "model.pt"
    torch.save(red_network_state(), path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    parser = ConfigParser()
    parser.read_config(INFERENCE_JSON)
    parser.update(TINY_NETWORK)
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def inference_workflow(dataset_dir, output_dir, checkpoint, initialize: bool = True, **overrides) -> ConfigWorkflow:
    settings = {
        "bundle_root": str(REPO_ROOT),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output_dir),
        "ckpt_path": str(checkpoint),
        "progress": False,
        "sw_batch_size": 16,
        # alignment tests compare pixel for pixel: at full resolution, no clean-up unless a test asks for it
        "image_scale": 1.0,
        "min_object_area": 0,
        "fill_holes": False,
        **overrides,
    }
    workflow = ConfigWorkflow(config_file=INFERENCE_JSON, workflow_type="infer", logging_file=False, **settings)
    if initialize:
        workflow.initialize()
    return workflow


class RecordedLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def referenced_ids(parser: ConfigParser, node) -> set[str]:
    """Ids referenced by ``node`` and, recursively, by the ids it references."""
    found: set[str] = set()
    pending = [node]
    while pending:
        text = json.dumps(pending.pop())
        for name in re.findall(r"@([A-Za-z_][\w#]*)", text):
            if name not in found:
                found.add(name)
                pending.append(parser[name])
    return found


def test_network_def_is_the_one_of_train_json():
    train, infer = ConfigParser(), ConfigParser()
    train.read_config(TRAIN_JSON)
    infer.read_config(INFERENCE_JSON)
    assert infer["network_def"] == train["network_def"]
    ids = referenced_ids(train, train["network_def"])
    assert ids == {
        "num_classes",
        "encoder",
        "encoder_kwargs",
        "patch_size",
        "head_channels",
        "decoder_channels",
        "embedding_dim",
        "freeze_encoder",
        "full_res_skip",
    }
    shared = {
        "intensity_mean",
        "intensity_std",
        "bundle_root",
        "device",
        "image_scale",
        "min_object_area",
        "fill_holes",
    }
    for name in sorted(ids | shared):
        assert infer[name] == train[name], name


def test_inference_inputs_from_folders_files_and_datalists(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "out").mkdir()
    for name in ("b.png", "a.TIF", "sub/c.jpg", "out/a_mask.png"):
        Image.fromarray(pattern(20, 30, 0)).save(folder / name, format="TIFF" if name.endswith("TIF") else None)
    (folder / ".hidden.png").write_bytes(b"not read")
    (folder / "readme.md").write_text("skipped")

    assert inference_inputs(folder) == [{"image": str(folder / "a.TIF")}, {"image": str(folder / "b.png")}]
    recursive = inference_inputs(folder, recursive=True, exclude=[folder / "out"])
    assert [item["image"] for item in recursive] == [str(folder / p) for p in ("a.TIF", "b.png", "sub/c.jpg")]
    assert inference_inputs(folder / "sub" / "c.jpg") == [{"image": str(folder / "sub" / "c.jpg")}]

    datalist = {"test": [{"image": "images/b.png", "label": "images/b.png"}], "unlabeled": [{"image": "images/a.TIF"}]}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    assert inference_inputs(tmp_path) == [{"image": str(folder / "b.png")}]
    assert inference_inputs(tmp_path / "datalist.json", datalist_key="unlabeled") == [{"image": str(folder / "a.TIF")}]

    layout = OutputFolderLayout(tmp_path / "masks", "mask", None, data_root_dir=folder, makedirs=False)
    assert layout.filename(subject=str(folder / "sub" / "c.jpg")) == str(tmp_path / "masks" / "sub" / "c_mask.png")
    assert layout.filename(subject=str(folder / "a.TIF")) == str(tmp_path / "masks" / "a_mask.tif")

    # masks written next to the images by an earlier run are not inputs of the next one
    Image.fromarray(pattern(20, 30, 0)).save(folder / "b_mask.png")
    assert [item["image"] for item in inference_inputs(folder, exclude=[folder])] == [
        str(folder / "a.TIF"),
        str(folder / "b.png"),
    ]
    assert [item["image"] for item in inference_inputs(folder)][-1] == str(folder / "b_mask.png")

    items = inference_inputs(folder, exclude=[folder])
    assert filter_by_size(items, 600) == items and filter_by_size(items, 600, large=True) == []
    assert filter_by_size(items, 599, large=True) == items and filter_by_size(items, None, large=True) == []


def test_tiled_tiff_writer_streams_bands_and_removes_partial_files(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.random((300, 520, 3)).astype(np.float16)
    with TiledTiffWriter(str(tmp_path / "p.tif"), 300, 520, np.float16, channels=3, tile=128) as writer:
        for top in range(0, 300, 256):
            writer.write_band(probabilities[top : top + 256])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "p.tif"), probabilities)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.pages[0].tile == (128, 128) and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE

    mask = rng.integers(0, 2, (300, 520), dtype=np.uint8)
    with pytest.raises(KeyError):
        with TiledTiffWriter(str(tmp_path / "m.tif"), 300, 520, np.uint8) as writer:
            writer.write_band(mask[:256])
            raise KeyError("the network failed")
    assert not (tmp_path / "m.tif").exists()
    writer = TiledTiffWriter(str(tmp_path / "m.tif"), 300, 520, np.uint8)
    writer.write_band(mask[:256])
    with pytest.raises(RuntimeError, match="only 256 of 300 rows were written"):
        writer.close()
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "input {path} does not exist; give an image file, a folder of images or a datalist"),
        ("empty", "no images in the folder {path} (supported: .png, .jpg, .jpeg, .bmp, .tif, .tiff)"),
        ("unsupported", "input {path} has an unsupported type '.txt' (use .png, .jpg, .jpeg, .bmp, .tif, .tiff, "),
        ("unreadable", "cannot read image file {path}: cannot identify image file"),
        ("duplicate", "images {path}/x.png and {path}/x.tif would write the same output x_mask; rename one of them"),
    ],
)
def test_inference_inputs_errors_are_one_line(tmp_path, case, message):
    path = tmp_path / "in"
    if case == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("")
    elif case == "unsupported":
        path = tmp_path / "list.txt"
        path.write_text("")
    elif case == "unreadable":
        path = tmp_path / "broken.png"
        path.write_bytes(b"this is not a PNG")
    elif case == "duplicate":
        path.mkdir()
        Image.fromarray(pattern(8, 8, 0)).save(path / "x.png")
        tifffile.imwrite(path / "x.tif", pattern(8, 8, 0))
    with pytest.raises(BundleInputError) as caught:
        inference_inputs(path)
    assert str(caught.value).startswith(message.format(path=path))
    assert "\n" not in str(caught.value)


def check_outputs(images: list[Path], out: Path, probabilities: bool) -> None:
    """One mask per image (and a probability map), with the image's size, equal to ``red > 127.5`` pixel for pixel."""
    names = {f"{p.stem}_mask{'.tif' if p.suffix == '.tif' else '.png'}" for p in images}
    if probabilities:
        names |= {f"{p.stem}_prob.tif" for p in images}
    assert {p.name for p in out.iterdir()} == names
    for image in images:
        rgb = decoded_rgb(image)
        mask_path = out / f"{image.stem}_mask{'.tif' if image.suffix == '.tif' else '.png'}"
        mask = tifffile.imread(mask_path) if mask_path.suffix == ".tif" else np.asarray(Image.open(mask_path))
        assert mask.dtype == np.uint8 and mask.shape == rgb.shape[:2], image.name
        np.testing.assert_array_equal(mask, expected_mask(rgb), err_msg=image.name)
        if probabilities:
            probability = tifffile.imread(out / f"{image.stem}_prob.tif")
            assert probability.dtype == np.float32 and probability.shape == rgb.shape[:2]
            assert probability.min() >= 0.0 and probability.max() <= 1.0
            np.testing.assert_array_equal(probability > 0.5, mask == 255, err_msg=image.name)


def test_masks_have_the_input_size_and_orientation(tmp_path, inputs, red_checkpoint):
    """GlaS PNGs, a JPEG, a BMP, a TIFF and an odd size through the evaluator, with probability maps."""
    out = tmp_path / "out"
    workflow = inference_workflow(
        inputs, out, red_checkpoint, network_def=RED_NETWORK, patch_size=[64, 64], save_probabilities=True
    )
    assert workflow.check_properties() == []
    assert workflow.parser.get_parsed_content("large_images#items") == []
    workflow.run()
    workflow.finalize()
    check_outputs(sorted(p for p in inputs.iterdir() if p.suffix != ".txt"), out, probabilities=True)
    with tifffile.TiffFile(out / "small_mask.tif") as tif:
        assert not tif.pages[0].is_tiled  # the whole-image path


def test_tiny_transunet_on_real_glas_with_class_index_masks(tmp_path, inputs, tiny_checkpoint):
    data = tmp_path / "glas"
    data.mkdir()
    for name in ("testA_1.png", "odd.png"):
        (data / name).symlink_to((inputs / name).resolve())
    workflow = inference_workflow(
        data, tmp_path / "out", tiny_checkpoint, mask_scale=1, output_ext=".tif", **TINY_NETWORK
    )
    workflow.run()
    for name, size in (("testA_1", (522, 775)), ("odd", (257, 301))):
        mask = tifffile.imread(tmp_path / "out" / f"{name}_mask.tif")
        assert mask.shape == size and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}


def masks_on_both_paths(tmp_path, data, checkpoint, stem: str, **overrides) -> dict[str, np.ndarray]:
    """The PNG mask of ``data/<stem>`` from the whole-image path and the tiled path (tiny blocks: several bands)."""
    outputs = {}
    for path_name, pixels in (("whole", 10**9), ("tiled", 1)):
        out = tmp_path / path_name
        settings = {"large_image_pixels": pixels, "large_image_block": 128, "large_image_tile": 64, **overrides}
        workflow = inference_workflow(data, out, checkpoint, network_def=RED_NETWORK, patch_size=[64, 64], **settings)
        workflow.run()
        outputs[path_name] = np.asarray(Image.open(out / f"{stem}_mask.png"))
    return outputs


def test_tiled_path_equals_whole_image_path_for_a_pixelwise_network(tmp_path, inputs, red_checkpoint):
    """The same PNG through both paths (tiny blocks force several bands and blocks) gives the same mask."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "odd.png").symlink_to(inputs / "odd.png")
    outputs = masks_on_both_paths(tmp_path, data, red_checkpoint, "odd")
    np.testing.assert_array_equal(outputs["tiled"], outputs["whole"])
    np.testing.assert_array_equal(outputs["whole"], expected_mask(decoded_rgb(inputs / "odd.png")))


@pytest.mark.parametrize("case", ["empty", "unreadable", "truncated", "missing_weights", "wrong_weights", "bad_option"])
def test_bad_inputs_give_one_clear_line(tmp_path, capsys, inputs, red_checkpoint, tiny_checkpoint, case):
    """Each problem is a BundleInputError naming the file, printed by the bundle's excepthook as one line."""
    data = tmp_path / "data"
    data.mkdir()
    if case != "empty":
        (data / "a.png").symlink_to(inputs / "odd.png")
    overrides: dict = {"network_def": RED_NETWORK}
    checkpoint = red_checkpoint
    if case == "empty":
        expected = f"no images in the folder {data} (supported: .png, .jpg, .jpeg, .bmp, .tif, .tiff)"
    elif case == "unreadable":
        (data / "b.tif").write_bytes(b"II*\x00garbage")
        expected = f"cannot read image file {data / 'b.tif'}: "
    elif case == "truncated":  # a valid header: found only when the evaluator decodes it
        complete = (inputs / "odd.png").read_bytes()
        (data / "cut.png").write_bytes(complete[: len(complete) // 2])
        expected = f"cannot read image file {data / 'cut.png'}: "
    elif case == "missing_weights":
        checkpoint = tmp_path / "models" / "model.pt"
        expected = (
            f"model weights file {checkpoint} does not exist; train the bundle first (it writes models/model.pt) "
            "or give another file with --ckpt_path"
        )
    elif case == "wrong_weights":  # trained for 2 classes, configured for 3
        overrides, checkpoint = {**TINY_NETWORK, "num_classes": 3}, tiny_checkpoint
        expected = (
            f"model weights in {tiny_checkpoint} do not fit the network: 2 tensors have other shapes "
            "(e.g. segmentation_head.bias: (2,) in the file, (3,) in the network); were they trained with the same "
            "network options (num_classes, encoder, encoder_kwargs, patch_size, head_channels, decoder_channels, "
            "embedding_dim)?"
        )
    else:
        overrides["output_ext"] = ".jpg"
        expected = "output_ext must be one of .png, .tif, .tiff or null (PNG, TIFF for TIFF inputs), got '.jpg'"
    workflow = inference_workflow(data, tmp_path / "out", checkpoint, initialize=False, **overrides)
    logged = RecordedLogs()
    stats_logger = logging.getLogger("monai.handlers.StatsHandler")
    stats_logger.addHandler(logged)
    try:
        with pytest.raises(Exception) as caught:  # options and inputs in initialize, files while running
            workflow.initialize()
            workflow.run()
    finally:
        stats_logger.removeHandler(logged)
    assert not [record for record in logged.records if record.exc_info]  # no traceback logged by StatsHandler
    error = find_input_error(caught.value)
    assert error is not None, f"not a BundleInputError: {caught.value!r}"
    assert str(error).startswith(expected) and "\n" not in str(error), str(error)
    written = {p.name for p in (tmp_path / "out").iterdir()} if (tmp_path / "out").exists() else set()
    assert written == ({"a_mask.png"} if case == "truncated" else set())  # images before the bad one are done
    capsys.readouterr()
    install_excepthook()  # what configs/inference.json's initialize does
    sys.excepthook(type(caught.value), caught.value, caught.value.__traceback__)
    assert capsys.readouterr().err == f"error: {error}\n"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The inference command with nothing of this repository on the path (the bundle is found from its config)."""
    return run_python(["-m", "monai.bundle", "run", "--config_file", INFERENCE_JSON, *args], cwd, repo_on_path=False)


def test_cli_from_another_directory_with_a_large_tiled_tiff(tmp_path, inputs, large_tiff, red_checkpoint):
    """The command users type, from another directory and without PYTHONPATH (the config finds the bundle): the
    4000x3000 tiled TIFF takes the tiled path, the other images the evaluator."""
    data = tmp_path / "data"
    data.mkdir()
    for path in [inputs / "train_2.png", inputs / "photo.jpg", inputs / "small.tif", large_tiff]:
        (data / path.name).symlink_to(path)
    out = tmp_path / "out"
    red = str(RED_NETWORK).replace(" ", "")
    common = ["--bundle_root", str(REPO_ROOT), "--dataset_dir", str(data), "--network_def", red]
    options = ["--patch_size", "[256,256]", "--sw_batch_size", "32", "--large_image_block", "2048"]
    options += [
        "--save_probabilities",
        "True",
        "--image_scale",
        "1.0",
        "--min_object_area",
        "0",
        "--fill_holes",
        "False",
    ]
    done = run_cli([*common, "--output_dir", str(out), "--ckpt_path", str(red_checkpoint), *options], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    check_outputs(sorted(data.iterdir()), out, probabilities=True)
    for name in ("slide_mask.tif", "slide_prob.tif"):
        with tifffile.TiffFile(out / name) as tif:
            assert tif.pages[0].is_tiled and tif.pages[0].tile == (256, 256)  # written band by band
    assert "slide.tif: 100%" in done.stderr  # the progress bar over its blocks


def shapes_image(size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """RGB with red discs (one with a hole) and 2x2 specks; and the mask the clean-up must give."""
    yy, xx = np.mgrid[:size, :size]
    red = np.zeros((size, size), bool)
    keep = np.zeros((size, size), bool)
    for cy, cx, radius in ((60, 60, 25), (60, 200, 18), (250, 120, 30), (200, 260, 20)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        red |= disc
        keep |= disc
    red[58:63, 198:203] = False  # a hole in the second disc (filled by the clean-up)
    for y, x in ((20, 150), (150, 30), (300, 300), (128, 128)):
        red[y : y + 2, x : x + 2] = True  # specks of 4 px (removed), one on a block corner
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 0] = np.where(red, 220, 30)
    rgb[..., 1] = 90
    return rgb, np.where(keep, 255, 0).astype(np.uint8)


def test_cleanup_removes_specks_and_fills_holes_on_both_paths(tmp_path, red_checkpoint):
    rgb, expected = shapes_image()
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(rgb).save(data / "shapes.png")
    outputs = masks_on_both_paths(tmp_path, data, red_checkpoint, "shapes", min_object_area=20, fill_holes=True)
    np.testing.assert_array_equal(outputs["whole"], expected)
    np.testing.assert_array_equal(outputs["tiled"], expected)


def test_mask_cleanup_by_hand():
    from bundle.inference import MaskCleanup, describe_cleanup

    mask = np.zeros((1, 12, 12), np.float32)
    mask[0, 1:6, 1:6] = 1
    mask[0, 3, 3] = 0  # a hole in a gland: filled
    mask[0, 8, 8] = 1  # a 1-px speck: removed
    mask[0, 8:11, 1:4] = 2
    mask[0, 9, 2] = 0  # a hole in class 2: filled with 2
    mask[0, 2:5, 8:11] = 1
    mask[0, 3, 9] = 2  # a 1-px speck of class 2 inside class 1: removed, then filled as the gland's hole
    expected = np.zeros((12, 12), np.float32)
    expected[1:6, 1:6] = 1
    expected[8:11, 1:4] = 2
    expected[2:5, 8:11] = 1
    out = MaskCleanup(min_object_area=5, fill_holes=True)(torch.as_tensor(mask))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 12, 12)
    np.testing.assert_array_equal(out[0].numpy(), expected)
    only_small = MaskCleanup(min_object_area=5)(mask[0])  # [H, W] numpy in, numpy out; holes stay
    assert only_small[3, 3] == 0 and only_small[8, 8] == 0 and only_small[3, 9] == 0
    assert MaskCleanup()(mask) is mask
    assert describe_cleanup(200, True) == "objects under 200 px removed, holes filled"
    assert describe_cleanup(0, False) == "none"
    for bad in (-1, 2.5, True):
        with pytest.raises(BundleInputError, match="min_object_area"):
            MaskCleanup(min_object_area=bad)


def test_scaled_inferer_runs_the_network_at_its_scale_and_returns_the_input_size():
    from monai.inferers import SimpleInferer

    from bundle.inference import ScaledInferer

    seen = []

    def network(x):
        seen.append(x.clone())
        return x[:, :2] * 2.0

    image = torch.rand(2, 3, 8, 12)
    out = ScaledInferer(SimpleInferer(), scale=0.5)(image, network)
    assert out.shape == (2, 2, 8, 12)
    # the network sees the area average of each 2x2 block (no aliasing), and a constant map comes back constant
    torch.testing.assert_close(seen[0], torch.nn.functional.avg_pool2d(image, 2))
    flat = ScaledInferer(SimpleInferer(), scale=0.5)(torch.full((1, 3, 8, 12), 0.25), network)
    torch.testing.assert_close(flat, torch.full((1, 2, 8, 12), 0.5))
    same = ScaledInferer(SimpleInferer(), scale=1.0)(image, network)
    assert seen[-1].shape == image.shape and torch.equal(same, image[:, :2] * 2.0)
    windows = ScaledInferer(type("W", (), {"roi_size": (64, 64)})(), scale=0.5)
    assert windows.roi_size == (128, 128)  # the context in input pixels, for the large-image margin
    for bad in (0, -0.5, 5, "half"):
        with pytest.raises(BundleInputError, match="image_scale"):
            ScaledInferer(SimpleInferer(), scale=bad)


def test_label_output_is_the_class_map_in_monai_xy_order():
    """The end of ``postprocessing``: [1, H, W] class map -> [W, H] uint8 with (x, y) spatial shapes, on the CPU."""
    from monai.data import MetaTensor

    class_map = MetaTensor(torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]]]), meta={"filename_or_obj": "a.jpg"})
    image = MetaTensor(torch.zeros(3, 2, 3), meta={"spatial_shape": np.asarray((2, 3))})
    out = LabelOutputd(keys="pred")({"pred": class_map, "image": image, "image_path": "/x/a.JPG"})
    label = out["pred"]
    assert label.dtype == torch.uint8 and label.device.type == "cpu"
    assert label.tolist() == [[0, 1], [1, 0], [2, 0]]  # row x of the label = column x of the map
    assert tuple(label.meta["spatial_shape"]) == (3, 2) and label.meta["filename_or_obj"] == "a.jpg"
    assert tuple(out["image"].meta["spatial_shape"]) == (3, 2)
    assert tuple(image.meta["spatial_shape"]) == (2, 3)  # the caller's image is not changed
    assert out["image"].data_ptr() == image.data_ptr()  # and not copied
    assert out["result_extension"] == ".png"  # a label is never written as JPEG
    kept = LabelOutputd(keys="pred")({"pred": class_map, "image_path": "a.jpg", "result_extension": ".nii.gz"})
    assert kept["result_extension"] == ".nii.gz"
    assert "result_extension" not in LabelOutputd(keys="pred")({"pred": class_map, "image_path": "a.tif"})

    with pytest.raises(ValueError, match="argmax"):
        LabelOutputd(keys="pred")({"pred": torch.full((1, 2, 2), 0.5)})
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        LabelOutputd(keys="pred")({"pred": torch.zeros(2, 2, 2)})


def test_existing_outputs_are_never_replaced_without_overwrite(tmp_path, inputs, red_checkpoint):
    """A ground-truth ``<name>_mask.png`` next to its image (or a previous run's mask) stops the run before any work;
    ``--overwrite True`` replaces it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").symlink_to(inputs / "odd.png")
    (data / "b.png").symlink_to(inputs / "odd.png")
    truth = np.zeros((4, 4), np.uint8)
    Image.fromarray(truth).save(data / "a_mask.png")
    before = (data / "a_mask.png").read_bytes()
    with pytest.raises(Exception) as caught:
        inference_workflow(data, data, red_checkpoint, network_def=RED_NETWORK).run()
    error = find_input_error(caught.value)
    assert str(error) == (
        f"{data / 'a_mask.png'} exists already; this run would replace it: choose another --output_dir or pass "
        "--overwrite True"
    )
    assert (data / "a_mask.png").read_bytes() == before and not (data / "b_mask.png").exists()  # nothing written

    workflow = inference_workflow(data, data, red_checkpoint, network_def=RED_NETWORK, overwrite=True)
    workflow.run()
    assert np.asarray(Image.open(data / "a_mask.png")).shape == np.asarray(Image.open(inputs / "odd.png")).shape[:2]
    with pytest.raises(Exception) as caught:  # a second run into the same folder: two masks there now
        inference_workflow(data, data, red_checkpoint, network_def=RED_NETWORK, save_probabilities=True).run()
    assert str(find_input_error(caught.value)).startswith(f"{data / 'a_mask.png'} (and 1 more) exists already")
