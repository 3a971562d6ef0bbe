"""Pyramidal TIFF masks: every level read back through tifffile and OpenSlide, resampling, mpp, failures, memory."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from bundle.errors import BundleInputError
from bundle.wsi.pyramid import PyramidWriter, default_mask_scale, pyramid_shapes

openslide = pytest.importorskip("openslide")

HEIGHT, WIDTH, TILE = 2000, 3000, 256
MPP = (0.2527, 0.2531)


def glands(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A 0/1 mask of random discs (gland-like blobs), so that every level has structure to compare."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:height, :width]
    mask = np.zeros((height, width), np.uint8)
    for cy, cx, radius in zip(rng.integers(0, height, 60), rng.integers(0, width, 60), rng.integers(10, 120, 60)):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    return mask


def write_shuffled(writer: PyramidWriter, values: np.ndarray, tile: int, seed: int = 1) -> None:
    """Write ``values`` tile by tile in a random order."""
    corners = [(top, left) for top in range(0, values.shape[0], tile) for left in range(0, values.shape[1], tile)]
    for index in np.random.default_rng(seed).permutation(len(corners)):
        top, left = corners[index]
        writer.write(values[top : top + tile, left : left + tile], top, left)


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyramid")
    mask = glands(HEIGHT, WIDTH)
    path = folder / "slide_mask.tif"
    with PyramidWriter.for_mask(path, mask.shape, num_classes=2, tile=TILE, mpp=MPP) as writer:
        write_shuffled(writer, mask, TILE)
    return path, mask * 255


def expected_shapes():
    # halved (rounded up) until the smallest side is at most one tile
    return [(2000, 3000), (1000, 1500), (500, 750), (250, 375)]


def test_level_shapes():
    assert pyramid_shapes((HEIGHT, WIDTH), TILE) == expected_shapes()
    assert pyramid_shapes((1001, 77), 256) == [(1001, 77)]
    assert pyramid_shapes((1001, 777), 256, levels=3) == [(1001, 777), (501, 389), (251, 195)]
    assert default_mask_scale(2) == 255 and default_mask_scale(4) == 1


def test_tifffile_reads_every_level(mask_file):
    path, expected = mask_file
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary or scratch file left
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 1
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == expected_shapes()
        for k, level in enumerate(levels):
            page = level.pages[0]
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            # nearest-neighbour downsample of level 0: every 2**k-th pixel
            np.testing.assert_array_equal(level.asarray(), expected[:: 2**k, :: 2**k])
        assert np.array_equal(tifffile.imread(path), expected)
        assert set(np.unique(expected)) == {0, 255}


def test_openslide_reads_every_level_and_mpp(mask_file):
    path, expected = mask_file
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as slide:
        shapes = expected_shapes()
        assert slide.level_count == len(shapes)
        assert slide.level_dimensions == tuple((w, h) for h, w in shapes)
        assert slide.level_downsamples == pytest.approx([1, 2, 4, 8])
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP[0], rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP[1], rel=1e-6)
        for k in range(slide.level_count):
            level = expected[:: 2**k, :: 2**k]
            # read_region takes level-0 coordinates; a region crossing tile borders, and the whole level
            top, left = 300 // 2**k, 700 // 2**k
            height, width = min(400, level.shape[0] - top), min(500, level.shape[1] - left)
            region = np.asarray(slide.read_region((left * 2**k, top * 2**k), k, (width, height)))
            np.testing.assert_array_equal(region[..., 0], level[top : top + height, left : left + width])
            assert (region[..., 3] == 255).all()
            whole = np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]))
            np.testing.assert_array_equal(whole[..., 0], level)


def test_class_ids_and_unaligned_pieces(tmp_path):
    """Class ids with mask_scale 1, pieces overlapping tile borders, parts never written are zero."""
    labels = np.random.default_rng(2).integers(0, 4, (700, 900)).astype(np.uint8)
    path = tmp_path / "ids.tif"
    with PyramidWriter.for_mask(path, labels.shape, num_classes=4, tile=128) as writer:
        for top, left, height, width in [(0, 0, 300, 1), (100, 50, 400, 333), (0, 0, 700, 400), (650, 850, 50, 50)]:
            writer.write(labels[top : top + height, left : left + width], top, left)
    expected = np.zeros_like(labels)
    expected[:, :400] = labels[:, :400]
    expected[100:500, 50:383] = labels[100:500, 50:383]
    expected[650:, 850:] = labels[650:, 850:]
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == pyramid_shapes(labels.shape, 128)
        for k, level in enumerate(levels):
            np.testing.assert_array_equal(level.asarray(), expected[:: 2**k, :: 2**k])
        assert tif.pages[0].tags.get("XResolution").value == (1, 1)  # no mpp given


def test_scaled_integer_labels_clip_instead_of_wrapping(tmp_path):
    """uint8 class 2 with mask_scale 255 is 255 (clipped), not 254 (uint8 arithmetic wraps)."""
    path = tmp_path / "clip.tif"
    with PyramidWriter.for_mask(path, (32, 32), num_classes=3, mask_scale=255, tile=16) as writer:
        writer.write(np.full((32, 32), 2, np.uint8), 0, 0)
        writer.write(np.ones((16, 16), bool), 16, 16)
    values = tifffile.imread(path)
    assert (values == 255).all()


def test_probability_levels_are_means(tmp_path):
    """[0, 1] probabilities become 0..255; each reduced pixel is the rounded mean of its 2 x 2 block."""
    probabilities = np.zeros((35, 50), np.float32)
    probabilities[0, 0:2] = [1.0, 0.5]  # uint8 255, 128 (rounded); row 1 is 0: mean 95.75 -> 96
    probabilities[:, -2:] = 1.0  # the last 2x2 column of blocks: 255
    probabilities[-1, :] = 0.2  # odd height: the last row is averaged with itself: 51
    path = tmp_path / "prob.tif"
    with PyramidWriter.for_probabilities(path, probabilities.shape, tile=16, levels=3) as writer:
        write_shuffled(writer, probabilities, 16)
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert [level.shape for level in levels] == [(35, 50), (18, 25), (9, 13)]
    assert levels[0][0, 0] == 255 and levels[0][0, 1] == 128 and levels[0][-1, 0] == 51
    assert levels[1][0, 0] == 96  # (255 + 128 + 0 + 0) / 4 = 95.75
    assert levels[1][0, 1] == 0
    assert (levels[1][:-1, -1] == 255).all()
    assert (levels[1][-1, :-1] == 51).all()
    assert levels[2][0, 0] == 24  # (96 + 0 + 0 + 0) / 4
    assert levels[2][-1, 0] == 26  # rows 16, 17 of level 1 are 0 and 51: 25.5, rounded half to even
    expected_level2 = np.rint(
        np.pad(levels[1].astype(float), ((0, 0), (0, 1)), mode="edge").reshape(9, 2, 13, 2).mean(axis=(1, 3))
    )
    np.testing.assert_array_equal(levels[2], expected_level2)


def test_disk_full_during_close_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC while the TIFF is written: BundleInputError naming the output, no temporary file, old file kept."""
    path = tmp_path / "full.tif"
    path.write_bytes(b"previous result")
    writer = PyramidWriter.for_mask(path, (600, 700), tile=128)
    write_shuffled(writer, glands(600, 700), 128)
    original = tifffile.TiffWriter.write
    calls = []

    def write_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # level 0 is in the file, level 1 does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffWriter, "write", write_then_fail)
    with pytest.raises(BundleInputError, match=f"{path}.*No space left on device"):
        writer.close()
    assert sorted(os.listdir(tmp_path)) == ["full.tif"]
    assert path.read_bytes() == b"previous result"


def test_failure_without_previous_file_and_abort(tmp_path, monkeypatch):
    path = tmp_path / "new.tif"
    writer = PyramidWriter(path, (300, 300), tile=64)
    writer.write(np.ones((300, 300), np.uint8), 0, 0)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(BundleInputError, match="new.tif"):
        writer.close()
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    with pytest.raises(RuntimeError, match="boom"):
        with PyramidWriter(path, (300, 300), tile=64) as writer:
            writer.write(np.ones((64, 64), np.uint8), 0, 0)
            assert len(os.listdir(tmp_path)) == 1  # the scratch file
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_bad_options_and_pieces(tmp_path):
    path = tmp_path / "bad.tif"
    for kwargs in [{"compression": "jpeg"}, {"resampling": "cubic"}, {"tile": 100}, {"mpp": (0, 1)}]:
        with pytest.raises(BundleInputError, match="bad.tif"):
            PyramidWriter(path, (100, 100), **kwargs)
    with pytest.raises(BundleInputError, match="bad.tif"):
        PyramidWriter(path, (0, 100))
    with PyramidWriter(path, (100, 100), tile=32, compression=None) as writer:
        with pytest.raises(ValueError, match="does not fit"):
            writer.write(np.ones((10, 10), np.uint8), 95, 0)
        writer.write(np.full((100, 100), 7, np.uint8), 0, 0)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
        assert (tif.series[0].levels[-1].asarray() == 7).all()
    with pytest.raises(BundleInputError, match="missing"):
        PyramidWriter(tmp_path / "missing" / "x.tif", (100, 100))


MEMORY_SCRIPT = textwrap.dedent("""
    import re, sys, time
    import numpy as np
    from bundle.wsi.pyramid import PyramidWriter

    def mb(key):
        return int(re.search(rf"{key}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    size, tile = int(sys.argv[2]), 512
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:tile, :tile]
    blob = (((yy - 256) ** 2 + (xx - 256) ** 2) < 200**2).astype(np.uint8)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) left by the imports
    before = mb("VmRSS")
    start = time.perf_counter()
    with PyramidWriter.for_mask(sys.argv[1], (size, size), tile=tile, mpp=(0.5, 0.5)) as writer:
        corners = [(t, l) for t in range(0, size, tile) for l in range(0, size, tile)]
        for i in rng.permutation(len(corners)):
            top, left = corners[i]
            writer.write(blob[: size - top, : size - left] * (rng.random() < 0.7), top, left)
    seconds = time.perf_counter() - start
    writer_peak = mb("VmHWM") - before
    array = np.ones((size, size), np.uint8)  # the known-size allocation the writer avoids
    print(writer_peak, mb("VmHWM") - before, seconds)
    """)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_memory_stays_small_for_a_large_mask(tmp_path):
    """A 20000 x 20000 mask (400 MB as an array) is written with a few MB above the interpreter's own memory.

    Run in a fresh interpreter whose peak RSS is reset after the imports; the writer's peak growth is compared with
    that of one full-resolution array, with a wide margin. Timing is only reported.
    """
    size = 20000
    path = tmp_path / "large.tif"
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), str(size)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=True,
    )
    writer_mb, array_mb, seconds = map(float, result.stdout.split())
    print(f"20000x20000 pyramid: writer peak +{writer_mb:.1f} MB (one array +{array_mb:.0f} MB), {seconds:.1f} s")
    assert array_mb > 300
    assert writer_mb < array_mb / 4
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions[0] == (size, size)
        assert slide.level_count == len(pyramid_shapes((size, size), 512))
