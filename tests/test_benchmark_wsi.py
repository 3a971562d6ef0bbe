"""``benchmarks/wsi.py`` on a tiny run: its figures checked against each other (never against a time)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from benchmarks import wsi


def windows_along(extent: int, roi: int, stride: int) -> int:
    """MONAI's sliding windows along one axis of ``extent`` pixels (an image below the window is padded to it)."""
    return math.ceil(max(extent - roi, 0) / stride) + 1


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsi_bench")
    argv = ["--network", "tiny", "--sizes", "2048", "1536", "--fit-steps", "30", "--threads", "1"]
    return wsi.main(argv + ["--json", str(out / "wsi.json"), "--keep", str(out / "work")])


def test_rates_and_speedup_follow_from_the_seconds(figures):
    for run in figures["sizes"]:
        for r in run["methods"].values():
            assert r["seconds"] > 0
            assert r["tissue_mp_per_s"] == pytest.approx(run["tissue_megapixels"] / r["seconds"])
            assert r["slide_mp_per_s"] == pytest.approx(run["megapixels"] / r["seconds"])
            assert r["above_baseline_mb"] == pytest.approx(r["peak_rss_mb"] - r["baseline_rss_mb"])
            assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
            assert r["segmented"] + r["skipped"] == r["total"]
            assert r["mask_mb"] > 0
        seconds = {m: r["seconds"] for m, r in run["methods"].items()}
        assert run["speedup"] == pytest.approx(seconds["whole"] / seconds["wsi"])
        assert run["methods"]["wsi"]["geojson_mb"] > 0
        wsi_run = run["methods"]["wsi"]
        assert run["tile_bound"] == pytest.approx(wsi_run["total"] / wsi_run["segmented"])
        # network windows, counted by a hook, against MONAI's window grid counted by hand: the WSI path's tile windows
        # carry the margin on every side (white off the slide), the block path's are clipped at the image's edge; the
        # WSI path's computed and skipped glass windows add up to its tiles' windows (here every tile has tissue)
        whole_windows = run["methods"]["whole"]["windows"]
        assert run["window_bound"] == pytest.approx(whole_windows / wsi_run["windows"])
        roi, stride, side = figures["roi"], int(figures["roi"] * (1 - figures["overlap"])), run["height"] // 2
        per_axis = functools.partial(windows_along, roi=roi, stride=stride)
        starts = range(0, side, wsi.WORK_TILE)
        tiles = sum(per_axis(min(wsi.WORK_TILE, side - t) + 2 * wsi.MARGIN) for t in starts) ** 2
        blocks = sum(per_axis(min(t + wsi.WORK_TILE + wsi.MARGIN, side) - max(t - wsi.MARGIN, 0)) for t in starts) ** 2
        assert wsi_run["segmented"] == wsi_run["total"]
        assert wsi_run["windows"] + wsi_run["glass_windows"] == tiles and whole_windows == blocks
        assert wsi_run["glass_windows"] > 0 and run["window_bound"] > 1
        # the whole-slide path runs every block of the working grid (level 1: half the level-0 side)
        side = math.ceil(run["height"] / 2 / wsi.WORK_TILE) * math.ceil(run["width"] / 2 / wsi.WORK_TILE)
        assert run["methods"]["whole"]["total"] == side == run["methods"]["wsi"]["total"]


def test_tissue_fraction_is_the_requested_one(figures):
    for run in figures["sizes"]:
        h, w = run["height"], run["width"]
        # by hand: each of the 2 ellipses sits in its half of the slide with area tissue * h * w / 2
        ellipses = wsi.sections(h, w, 0.3, 2)
        assert [e[:2] for e in ellipses] == [(h / 2, w / 4), (h / 2, 3 * w / 4)]
        assert sum(math.pi * ry * rx for _, _, ry, rx in ellipses) == pytest.approx(0.3 * h * w)
        assert run["ellipse_fraction"] == pytest.approx(0.3)
        assert run["tissue_fraction"] == pytest.approx(0.3, abs=0.005)  # pixels drawn vs the ellipses' area
        assert run["methods"]["wsi"]["detected_tissue"] == pytest.approx(0.3, abs=0.03)
        assert run["tissue_megapixels"] == pytest.approx(run["tissue_fraction"] * run["megapixels"])


def test_masks_agree_on_tissue_tiles(figures):
    for run in figures["sizes"]:
        # same network, same pixels, same windows: only tiles at the slide's edge could differ (see the docstring)
        assert run["iou"] > wsi.MIN_IOU
        assert 0.05 <= run["wsi_foreground_share"] <= 0.95  # not a constant prediction agreeing trivially
        assert run["methods"]["wsi"]["level"] == 1 and run["methods"]["wsi"]["scale"] == pytest.approx(1.0)


def test_checks_are_reported(figures):
    names = [c["name"] for c in figures["checks"]]
    assert len(names) == 2 * len(figures["sizes"]) + 1
    assert any("peak RSS" in n for n in names) and any("faster" in n for n in names)
    iou = [c for c in figures["checks"] if "IoU" in c["name"]]
    assert all(c["pass"] for c in iou)


def test_generator_draws_levels_consistently():
    tile = np.full((8, 8, 3), 120, np.uint8)
    slide = wsi.SyntheticSlide(1200, 1600, 0.3, 2, tile, min_side=256)
    assert slide.shapes == [(1200, 1600), (600, 800), (300, 400), (150, 200)]
    tiles = list(slide.tiles(0))
    assert len(tiles) == math.ceil(1200 / wsi.TILE) * math.ceil(1600 / wsi.TILE)
    assert slide.tissue_pixels / (1200 * 1600) == pytest.approx(0.3, abs=0.005)
    centre = slide.draw(1, 300, 200, 1, 1)  # the centre of the left section at level 1
    corner = slide.draw(1, 0, 0, 1, 1)
    assert (centre == 120).all() and (corner >= 236).all()
