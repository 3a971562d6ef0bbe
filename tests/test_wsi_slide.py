"""``bundle.wsi.slide`` and ``bundle.wsi.tissue`` on slides built here: three real GlaS images on a 5000 x 6000 px
off-white canvas, written as a 4-level pyramidal TIFF at 0.31 µm/px (half GlaS's 0.62, so level choice matters).

Checks: the resolution read back by both backends, the level rule on hand-computed targets, reads at levels 0-2
equal to the arrays written (a flipped axis or a location in the level's own pixels would fail), MONAI's
``get_data`` conventions themselves, the tissue mask against the true placement, a blank slide, and the user errors
(no resolution, corrupt files, missing levels).
"""

from __future__ import annotations

import sys

import numpy as np
import openslide
import pytest
from monai.data import WSIReader
from wsi_fixtures import glas_canvas, off_white, pyramid, write_ome_subifds, write_tiled_pyramid

from bundle.errors import BundleInputError
from bundle.wsi.slide import Slide, model_mpp
from bundle.wsi.tissue import detect_tissue, read_low_resolution

MPP = 0.31
NAMES = ["testA_2", "testA_10", "testA_5"]  # mostly tissue (few white pixels)
PLACES = [(800, 900), (2600, 3500), (3900, 1200)]
BACKENDS = ["openslide", "tifffile"]


@pytest.fixture(scope="module")
def slides(glas_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wsi")
    canvas, boxes = glas_canvas(glas_dir, NAMES, PLACES)
    levels = pyramid(canvas, 4)  # 5000x6000, 2500x3000, 1250x1500, 625x750
    small = pyramid(canvas[600:1800, 700:2200], 2)
    paths = {
        "glas": write_tiled_pyramid(folder / "glas.tif", levels, MPP),
        "nores": write_tiled_pyramid(folder / "nores.tif", small, None),
        "blank": write_tiled_pyramid(folder / "blank.tif", pyramid(off_white((2000, 2400), seed=1), 2), 0.5),
        "ome": write_ome_subifds(folder / "sub.ome.tif", small, 0.25),
    }
    data = paths["nores"].read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "notes.svs").write_text("this is a text file, not a slide\n")
    paths.update(truncated=folder / "truncated.tif", text=folder / "notes.svs")
    return {"paths": paths, "levels": levels, "boxes": boxes, "small": small}


def test_the_test_slide_is_what_openslide_reads(slides):
    """The fixture's layout is a real OpenSlide pyramid with its resolution, not something only tifffile accepts."""
    with openslide.OpenSlide(str(slides["paths"]["glas"])) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_dimensions == ((6000, 5000), (3000, 2500), (1500, 1250), (750, 625))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_and_levels(slides, backend):
    with Slide(slides["paths"]["glas"], backend=backend) as slide:
        assert slide.backend == backend
        assert slide.mpp == pytest.approx((MPP, MPP))
        assert [(lv.height, lv.width) for lv in slide.levels] == [(5000, 6000), (2500, 3000), (1250, 1500), (625, 750)]
        assert [lv.downsample for lv in slide.levels] == [(1, 1), (2, 2), (4, 4), (8, 8)]
        assert [lv.mpp[0] for lv in slide.levels] == pytest.approx([0.31, 0.62, 1.24, 2.48])


@pytest.mark.parametrize("backend", BACKENDS)
def test_choose_level(slides, backend):
    """Levels at 0.31, 0.62, 1.24, 2.48 µm/px: the coarsest not coarser than the target (5% tolerance)."""
    with Slide(slides["paths"]["glas"], backend=backend) as slide:
        expected = {
            model_mpp(0.5): (2, 1.0),  # the default model: GlaS 0.62 / 0.5 = 1.24 -> level 2 as is
            model_mpp(1.0): (1, 1.0),  # 0.62 -> level 1
            1.0: (1, 0.62),  # 1.24 is too coarse: level 1 shrunk to 1.0
            1.2: (2, 1.24 / 1.2),  # 1.24 is within 5% of 1.2: level 2, enlarged by 3%
            1.1: (1, 0.62 / 1.1),  # 1.24 is 13% coarser: level 1
            5.0: (3, 2.48 / 5.0),
            0.25: (0, 0.31 / 0.25),  # finer than the slide: level 0 enlarged
        }
        for target, (level, scale) in expected.items():
            choice = slide.choose_level(target)
            assert (choice.level, choice.scale) == (level, pytest.approx(scale)), target
        with pytest.raises(BundleInputError, match="positive"):
            slide.choose_level(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_matches_the_written_levels(slides, backend):
    levels = slides["levels"]
    with Slide(slides["paths"]["glas"], backend=backend) as slide:
        np.testing.assert_array_equal(slide.read(0, 1234, 2345, 300, 200), levels[0][1234:1534, 2345:2545])
        np.testing.assert_array_equal(slide.read(1, 601, 703, 100, 150), levels[1][601:701, 703:853])
        np.testing.assert_array_equal(slide.read(2, 970, 870, 64, 96), levels[2][970:1034, 870:966])
        # a tile over the bottom-right corner: the slide's pixels, then white
        edge = slide.read(1, 2450, 2900, 100, 200)
        np.testing.assert_array_equal(edge[:50, :100], levels[1][2450:, 2900:])
        assert (edge[50:] == 255).all() and (edge[:, 100:] == 255).all()
        assert (slide.read(0, -50, -50, 40, 40) == 255).all()
        assert slide.read(3, 0, 0, 625, 750).dtype == np.uint8


@pytest.mark.parametrize("backend", BACKENDS)
def test_monai_get_data_conventions(slides, backend):
    """MONAI's WSIReader: location (top, left) in level-0 pixels, size (height, width) at the level, mpp (y, x)."""
    reader = WSIReader(backend=backend, channel_dim=-1)
    wsi = reader.read(str(slides["paths"]["glas"]))
    try:
        patch, _ = reader.get_data(wsi, location=(1200, 1400), size=(50, 70), level=1)
        np.testing.assert_array_equal(patch, slides["levels"][1][600:650, 700:770])
        assert reader.get_size(wsi, 1) == (2500, 3000)
        assert reader.get_mpp(wsi, 1) == pytest.approx((2 * MPP, 2 * MPP))
    finally:
        wsi.close()


def test_tissue_mask_covers_the_glas_images(slides):
    boxes = slides["boxes"]
    with Slide(slides["paths"]["glas"]) as slide:
        tissue = detect_tissue(slide)
    assert tissue.level == 2 and tissue.downsample == (4, 4) and tissue.notice is None
    truth = np.zeros_like(tissue.mask)
    for top, left, h, w in boxes:
        truth[top // 4 : (top + h) // 4, left // 4 : (left + w) // 4] = True
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.8, iou
    # by hand: (453 x 589 + 2 x 522 x 775) / (5000 x 6000) = 0.0359
    assert tissue.fraction == pytest.approx(0.0359, rel=0.15)

    selection = tissue.tiles(512)
    assert selection.total == 10 * 12

    def touching(grow: int) -> set:
        out = set()
        for top, left, h, w in boxes:
            for r in range(0, 5000, 512):
                for c in range(0, 6000, 512):
                    if r < top + h + grow and r + 512 > top - grow and c < left + w + grow and c + 512 > left - grow:
                        out.add((r, c))
        return out

    chosen = {(top, left) for top, left, _, _ in selection.boxes}
    assert touching(-16) <= chosen <= touching(16)
    assert len(chosen) + selection.skipped == 120 and selection.skipped >= 100
    with_margin = {(top, left) for top, left, _, _ in tissue.tiles(512, margin=256).boxes}
    assert chosen <= with_margin <= touching(256 + 16)


def test_low_resolution_of_a_large_level(slides):
    """A slide without a small level is read in strips and block-averaged (here level 0 by 3, to 1667 x 2000)."""
    from skimage.transform import downscale_local_mean

    with Slide(slides["paths"]["glas"]) as slide:
        image, downsample = read_low_resolution(slide, 0, max_side=2048)
    assert downsample == (3, 3) and image.shape == (1667, 2000, 3)
    expected = downscale_local_mean(slides["levels"][0].astype(np.float32), (3, 3, 1), cval=255)
    assert np.abs(image - expected).max() <= 0.5 + 1e-3


def test_blank_slide_gives_no_tiles(slides):
    with Slide(slides["paths"]["blank"]) as slide:
        tissue = detect_tissue(slide)
    selection = tissue.tiles(256)
    assert tissue.fraction == 0 and selection.boxes == [] and selection.skipped == 8 * 10
    assert "no tissue found" in tissue.notice and "blank.tif" in tissue.notice


def test_missing_resolution_needs_mpp(slides):
    path = slides["paths"]["nores"]
    for backend in ["auto", *BACKENDS]:
        with pytest.raises(BundleInputError, match="--mpp") as error:
            Slide(path, backend=backend)
        assert str(path) in str(error.value)
    with Slide(path, mpp=0.5) as slide:
        assert slide.mpp == (0.5, 0.5) and slide.levels[1].mpp == (1.0, 1.0)
        assert slide.choose_level(1.24) == (1, pytest.approx(1.0 / 1.24))
        np.testing.assert_array_equal(slide.read(1, 10, 20, 30, 40), slides["small"][1][10:40, 20:60])
    with pytest.raises(BundleInputError, match="--mpp"):
        Slide(path, mpp=-1)


def test_ome_subifd_pyramid_uses_tifffile(slides):
    """OpenSlide sees one level of an OME-TIFF whose pyramid is in SubIFDs: auto reads it with tifffile."""
    with Slide(slides["paths"]["ome"]) as slide:
        assert slide.backend == "tifffile" and len(slide.levels) == 2
        assert slide.mpp == pytest.approx((0.25, 0.25))
        np.testing.assert_array_equal(slide.read(1, 5, 7, 20, 30), slides["small"][1][5:25, 7:37])


@pytest.mark.parametrize("name", ["truncated", "text"])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_corrupt_files(slides, name, backend):
    path = slides["paths"][name]
    with pytest.raises(BundleInputError) as error:
        Slide(path, backend=backend, mpp=0.5)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_bad_level_and_missing_file(slides, tmp_path):
    with Slide(slides["paths"]["glas"]) as slide:
        with pytest.raises(BundleInputError, match=r"level 4 does not exist; available levels: 0 \(6000x5000 px\)"):
            slide.read(4, 0, 0, 10, 10)
    with pytest.raises(BundleInputError, match="slide not found"):
        Slide(tmp_path / "missing.svs")
    with pytest.raises(BundleInputError, match="backend"):
        Slide(slides["paths"]["glas"], backend="pillow")


def test_cucim_backend_without_cucim_names_it(slides, monkeypatch):
    """``--wsi_backend cucim`` where cuCIM is not installed (a CPU machine): one line naming the package and the
    backends that work, before MONAI's reader is built."""
    monkeypatch.setitem(sys.modules, "cucim", None)  # import cucim -> ImportError, installed or not
    with pytest.raises(BundleInputError) as error:
        Slide(slides["paths"]["glas"], backend="cucim")
    assert "needs the cucim package" in str(error.value) and "'openslide' or 'auto'" in str(error.value)
    assert "\n" not in str(error.value)
