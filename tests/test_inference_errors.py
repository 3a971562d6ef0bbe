"""configs/inference.json when images cannot be read or outputs cannot be written: ``--on_error stop|skip`` and
outputs that never exist half-written under their final name.

Real GlaS images (copied into a temporary folder) with a truncated PNG and a zero-byte file: ``--on_error skip``
segments the readable ones exactly as a run on them alone, lists the others and exits with status 1; the default
stops at the first bad file. The large-image path skips a TIFF whose last tile is corrupt and leaves no partial
mask. Writes that fail midway (disk full) leave neither the final name nor the temporary file.
"""

from __future__ import annotations

import csv
import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import CONFIGS, REPO_ROOT, run_python
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor
from PIL import Image

import bundle.inference.writers as writers
from bundle.errors import BundleInputError, find_input_error
from bundle.inference import SaveSegmentationd, TiledTiffWriter, check_output_files, write_map

INFERENCE_JSON = str(CONFIGS / "inference.json")
TINY_JSON = str(CONFIGS / "tiny.json")
GOOD = ("testA_1.png", "testA_2.png", "train_2.png")
EMPTY, CUT = "a_empty.png", "m_cut.png"  # sorted before the GlaS names: the first bad file is the zero-byte one
# a network that predicts "foreground" where red is above 127.5 (after the config's normalisation), pixel by pixel
RED_NETWORK = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 2, "kernel_size": 1}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    parser = ConfigParser()
    parser.read_config([INFERENCE_JSON, TINY_JSON])
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def red_checkpoint(tmp_path_factory) -> Path:
    cut = (127.5 / 255.0 - 0.485) / 0.229
    weight = torch.zeros(2, 3, 1, 1)
    weight[1, 0] = 10.0
    path = tmp_path_factory.mktemp("red") / "model.pt"
    torch.save({"weight": weight, "bias": torch.tensor([0.0, -10.0 * cut])}, path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, glas_dir) -> dict[str, Path]:
    """``good``: 3 GlaS images; ``mixed``: the same 3, a truncated PNG (valid header) and a zero-byte PNG."""
    good, mixed = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("mixed")
    for name in GOOD:
        shutil.copy(glas_dir / "images" / name, good / name)
        shutil.copy(glas_dir / "images" / name, mixed / name)
    complete = (glas_dir / "images" / "testA_3.png").read_bytes()
    (mixed / CUT).write_bytes(complete[: len(complete) // 2])
    (mixed / EMPTY).write_bytes(b"")
    return {"good": good, "mixed": mixed}


def cli(data: Path, out: Path, checkpoint: Path, *args: str):
    """The inference command (tiny network) in a child process."""
    config_files = f"['{INFERENCE_JSON}','{TINY_JSON}']"
    common = ["--bundle_root", str(REPO_ROOT), "--dataset_dir", str(data), "--output_dir", str(out)]
    common += ["--ckpt_path", str(checkpoint), "--progress", "False"]
    return run_python(["-m", "monai.bundle", "run", "--config_file", config_files, *common, *args], cwd=data.parent)


def workflow(data: Path, out: Path, checkpoint: Path, files=(INFERENCE_JSON, TINY_JSON), **overrides):
    settings = {"bundle_root": str(REPO_ROOT), "dataset_dir": str(data), "output_dir": str(out)}
    settings.update(ckpt_path=str(checkpoint), progress=False, **overrides)
    return ConfigWorkflow(config_file=list(files), workflow_type="infer", logging_file=False, **settings)


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_skip_segments_the_readable_images_lists_the_others_and_fails(tmp_path, folders, tiny_checkpoint):
    reference = tmp_path / "reference"
    alone = workflow(folders["good"], reference, tiny_checkpoint)
    alone.initialize()
    alone.run()
    out = tmp_path / "out"
    done = cli(folders["mixed"], out, tiny_checkpoint, "--on_error", "skip")
    listed = out / "skipped.csv"
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert done.stderr.splitlines()[-1] == f"error: 2 of 5 images could not be read (listed in {listed})"
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [done.stderr.splitlines()[-1]]
    empty, cut = folders["mixed"] / EMPTY, folders["mixed"] / CUT
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: skipping ")]
    assert len(warnings) == 2 and warnings[0].startswith(f"warning: skipping {empty}: ")
    assert warnings[1].startswith(f"warning: skipping {cut}: ") and "truncated" in warnings[1]
    with listed.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image", "reason"] and [row[0] for row in rows[1:]] == [str(empty), str(cut)]
    assert all(row[1] for row in rows[1:])
    masks = sorted(f"{Path(name).stem}_mask.png" for name in GOOD)
    assert sorted(p.name for p in out.iterdir()) == sorted(masks + ["skipped.csv"])  # no temporary file left
    for name in masks:
        np.testing.assert_array_equal(read_mask(out / name), read_mask(reference / name), err_msg=name)


def test_stop_is_the_default_and_names_the_first_bad_file(tmp_path, folders, tiny_checkpoint):
    out = tmp_path / "out"
    done = cli(folders["mixed"], out, tiny_checkpoint)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot read image file {folders['mixed'] / EMPTY}: "), lines[-1]
    assert not [line for line in lines if line.startswith("warning:")]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("value", ["continue", "Skip", 1])
def test_a_bad_on_error_value_is_refused_in_initialize(tmp_path, folders, tiny_checkpoint, value):
    flow = workflow(folders["good"], tmp_path / "out", tiny_checkpoint, on_error=value)
    with pytest.raises(Exception) as caught:
        flow.initialize()
    assert str(find_input_error(caught.value)) == f"--on_error must be stop or skip, got {value!r}"


def corrupt_last_tile(path: Path, rgb: np.ndarray) -> None:
    """A tiled, zlib-compressed TIFF whose header and first tiles are fine and whose last tile is garbage."""
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = int(tif.pages[0].dataoffsets[-1]), int(tif.pages[0].databytecounts[-1])
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * count)


def test_skip_on_the_large_image_path_leaves_no_partial_mask(tmp_path, glas_dir, red_checkpoint):
    """Every image on the block-wise path: a PNG that decodes, a truncated PNG, a zero-byte file and a tiled TIFF
    found corrupt at its last tile, after its first bands were written."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(glas_dir / "images" / "testA_2.png", data / "good.png")
    complete = (glas_dir / "images" / "testA_3.png").read_bytes()
    (data / "cut.png").write_bytes(complete[: len(complete) // 2])
    (data / "empty.png").write_bytes(b"")
    rgb = np.asarray(Image.open(glas_dir / "images" / "testA_1.png").convert("RGB"))[:300, :260]
    corrupt_last_tile(data / "slide.tif", rgb)
    out = tmp_path / "out"
    settings = {"network_def": RED_NETWORK, "patch_size": [64, 64], "image_scale": 1.0, "min_object_area": 0}
    settings.update(fill_holes=False, large_image_pixels=1, large_image_block=128, large_image_tile=64)
    flow = workflow(data, out, red_checkpoint, files=(INFERENCE_JSON,), on_error="skip", **settings)
    flow.initialize()
    with pytest.raises(Exception) as caught:
        flow.run()
    listed = out / "skipped.csv"
    assert str(find_input_error(caught.value)) == f"3 of 4 images could not be read (listed in {listed})"
    with listed.open(newline="") as handle:
        assert [row[0] for row in csv.reader(handle)][1:] == [
            str(data / n) for n in ("cut.png", "empty.png", "slide.tif")
        ]
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.png", "skipped.csv"]  # no slide_mask.tif, no temp
    good = np.asarray(Image.open(data / "good.png").convert("RGB"))
    np.testing.assert_array_equal(read_mask(out / "good_mask.png"), np.where(good[..., 0] > 127.5, 255, 0))


def test_an_existing_skipped_list_is_an_output_like_the_masks(tmp_path):
    (tmp_path / "skipped.csv").write_text("image,reason\n")
    items = [{"image": str(tmp_path / "a.png")}]
    assert check_output_files(items, tmp_path) == [str(tmp_path / "a_mask.png")]
    with pytest.raises(BundleInputError, match="skipped.csv exists already"):
        check_output_files(items, tmp_path, extra_files=["skipped.csv"])
    assert check_output_files(items, tmp_path, overwrite=True, extra_files=["skipped.csv"])[-1].endswith("skipped.csv")


def disk_full_midway(write_to_path):
    """A stand-in for a library's write: some bytes reach the file, then the disk is full."""

    def write(target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        if write_to_path is not None:
            write_to_path.append(str(target))
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch, suffix):
    """write_map (masks and probability maps of both paths) through SaveSegmentationd, as the evaluator calls it."""
    targets: list[str] = []
    if suffix == ".png":
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: disk_full_midway(targets)(fp))
    else:
        monkeypatch.setattr(writers.tifffile, "imwrite", disk_full_midway(targets))
    out = tmp_path / "out"
    saver = SaveSegmentationd(keys="pred", output_dir=str(out), output_ext=suffix, scale=255)
    meta = {"filename_or_obj": str(tmp_path / "image.png"), "spatial_shape": np.asarray((6, 8))}
    with pytest.raises(Exception) as caught:
        saver({"pred": MetaTensor(torch.ones(1, 6, 8), meta=meta)})
    final = out / f"image_mask{suffix}"
    assert str(find_input_error(caught.value)) == f"cannot write {final}: No space left on device"
    assert targets and targets[0] != str(final) and Path(targets[0]).parent == out  # written next to it, renamed
    assert not final.exists() and list(out.iterdir()) == []  # the temporary file is gone too

    final.write_bytes(b"an earlier result")  # with --overwrite: the old file stays until a new one is complete
    with pytest.raises(BundleInputError, match=f"cannot write {final}: No space left on device"):
        write_map(str(final), np.zeros((6, 8), np.uint8))
    assert final.read_bytes() == b"an earlier result" and [p.name for p in out.iterdir()] == [final.name]


def test_a_failed_tiled_tiff_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    """The large-image path's streaming writer: the disk fills after the first tiles were written."""
    real_imwrite = tifffile.imwrite

    def imwrite(target, data=None, **kwargs):
        def tiles():
            for index, tile in enumerate(data):
                if index == 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                yield tile

        real_imwrite(target, data=tiles(), **kwargs)

    monkeypatch.setattr(writers.tifffile, "imwrite", imwrite)
    final = tmp_path / "slide_mask.tif"
    with pytest.raises(BundleInputError) as caught:
        with TiledTiffWriter(str(final), 300, 520, np.uint8, tile=128) as writer:
            writer.write_band(np.ones((256, 520), np.uint8))
            writer.write_band(np.ones((44, 520), np.uint8))
    assert str(caught.value) == f"cannot write {final}: No space left on device"
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(writers.tifffile, "imwrite", real_imwrite)
    with TiledTiffWriter(str(final), 300, 520, np.uint8, tile=128) as writer:
        writer.write_band(np.ones((256, 520), np.uint8))
        assert not final.exists() and Path(writer.temp_path).parent == tmp_path  # only the temporary name so far
        writer.write_band(np.ones((44, 520), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == [final.name] and tifffile.imread(final).shape == (300, 520)


def test_scaled_integer_labels_clip_instead_of_wrapping():
    from bundle.inference.writers import to_output_dtype

    classes = np.array([[0, 1, 2]], dtype=np.uint8)
    assert to_output_dtype(classes, np.uint8, 255).tolist() == [[0, 255, 255]]  # uint8 arithmetic gave 254 for 2
    assert to_output_dtype(classes, np.uint16, 255).tolist() == [[0, 255, 510]]
    assert to_output_dtype(np.array([0.25, 0.5]), np.uint8, 255).tolist() == [64, 128]  # rounded half to even
