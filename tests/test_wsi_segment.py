"""Whole-slide segmentation (``bundle.wsi.segment`` through configs/inference_wsi.json) with a network whose answer is
known: a 1x1 convolution that calls "gland" every pixel whose red value is below 160 (after the config's
normalisation), loaded from a checkpoint like trained weights.

The slide: three real GlaS images on a 5000 x 6000 px off-white canvas at 0.5 µm/px, a 4-level pyramid. The default
model (``image_scale`` 0.5) works at 1.24 µm/px, so level 1 (1.0 µm/px) is read and shrunk by 0.806: a wrong level,
a missing residual scale, swapped axes or misplaced tiles all move the result. The expected mask is computed here
independently: level 1 shrunk by exact pixel-area averaging (integrals of the piecewise-constant image, from
cumulative sums), the red condition, the clean-up on the whole image. (torch's ``area`` resize is adaptive pooling
with overlapping windows and a ratio rounded to whole output sizes: half a pixel off, which on nuclei-sized objects
at 1.24 µm/px is not a reference.)
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import openslide
import pytest
import shapely
import tifffile
import torch
from helpers import REPO_ROOT, run_python
from monai.bundle import ConfigWorkflow
from shapely import affinity
from shapely.geometry import mapping, shape
from test_wsi_geojson import rasterise
from wsi_fixtures import glas_canvas, pyramid, write_tiled_pyramid

from bundle.errors import BundleInputError
from bundle.inference import MaskCleanup
from bundle.wsi.slide import GLAS_MPP, model_mpp

CONFIGS = [str(REPO_ROOT / "configs" / "inference.json"), str(REPO_ROOT / "configs" / "inference_wsi.json")]
MPP = 0.5
NAMES = ["testA_2", "testA_10", "testA_5"]
PLACES = [(800, 900), (2600, 3500), (3900, 1200)]
DARK_NETWORK = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 2, "kernel_size": 1}
RED_CUT = 160.0
TILE, MARGIN = 512, 32
MIN_OBJECT_AREA = 200  # GlaS pixels: 200 * (0.62 / 1.24)^2 = 50 working pixels
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SETTINGS = {
    "patch_size": [256, 256],
    "sw_batch_size": 4,
    "wsi_tile_size": TILE,
    "wsi_margin": MARGIN,
    "min_object_area": MIN_OBJECT_AREA,
    "fill_holes": True,
    "progress": False,
}


def dark_state() -> dict[str, torch.Tensor]:
    cut = (RED_CUT / 255.0 - MEAN[0]) / STD[0]
    weight = torch.zeros(2, 3, 1, 1)
    weight[1, 0] = -10.0
    return {"weight": weight, "bias": torch.tensor([0.0, 10.0 * cut])}


def shrink(image: np.ndarray, scale: float, count: int) -> np.ndarray:
    """Rows of ``image`` averaged over the footprints ``[j / scale, (j + 1) / scale)`` (white beyond the end)."""
    padded = np.concatenate([image, np.full((int(count / scale) + 2 - image.shape[0], *image.shape[1:]), 255.0)])
    total = np.concatenate([np.zeros((1, *image.shape[1:])), np.cumsum(padded, axis=0)])

    def integral(x):  # of the piecewise-constant rows from 0 to x
        base = np.floor(x).astype(int)
        return total[base] + (x - base)[:, None] * padded[base]

    edges = np.arange(count + 1) / scale
    return (integral(edges[1:]) - integral(edges[:-1])) * scale


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def case(glas_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wsi_segment")
    canvas, boxes = glas_canvas(glas_dir, NAMES, PLACES)
    levels = pyramid(canvas, 4)  # 0.5, 1.0, 2.0, 4.0 µm/px
    slides = folder / "slides"
    slides.mkdir()
    slide = write_tiled_pyramid(slides / "glas.tif", levels, MPP)
    nores = write_tiled_pyramid(folder / "nores.tif", pyramid(canvas[600:1800, 700:2200], 2), None)
    checkpoint = folder / "dark.pt"
    torch.save(dark_state(), checkpoint)
    # the expected mask on the working grid: level 1 shrunk by 1.0 / 1.24
    scale = 1.0 / model_mpp(0.5)
    level1 = levels[1]
    working = (math.ceil(level1.shape[0] * scale), math.ceil(level1.shape[1] * scale))
    red = shrink(shrink(level1[..., 0].astype(np.float64), scale, working[0]).T, scale, working[1]).T
    expected = (red < RED_CUT).astype(np.uint8)
    min_area = round(MIN_OBJECT_AREA * GLAS_MPP**2 / model_mpp(0.5) ** 2)
    expected = np.asarray(MaskCleanup(min_area, True)(expected))
    return {
        "folder": folder,
        "slides": slides,
        "slide": slide,
        "nores": nores,
        "checkpoint": checkpoint,
        "boxes": boxes,
        "expected": expected,
        "step": 2.0 / scale,  # level-0 pixels per working pixel
        "level0": levels[0].shape[:2],
    }


def workflow(case, output_dir, **overrides) -> ConfigWorkflow:
    flow = ConfigWorkflow(
        config_file=CONFIGS,
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(REPO_ROOT),
        slides=str(case["slides"]),
        output_dir=str(output_dir),
        ckpt_path=str(case["checkpoint"]),
        network_def=DARK_NETWORK,
        device="cpu",
        **{**SETTINGS, **overrides},
    )
    flow.initialize()
    return flow


def counted_run(case, out, **overrides) -> dict:
    """One in-process run of the config, the inferers wrapped to count the tiles they are called on and the network
    hooked to count the windows it runs."""
    flow = workflow(case, out, **overrides)
    segmenter = flow.parser.get_parsed_content("wsi_segmenter")
    calls, windows = [], []
    segmenter.network.register_forward_hook(lambda module, args, output: windows.append(args[0].shape[0]))
    for name in ("inferer", "glass_inferer"):
        inner = getattr(segmenter, name)
        if inner is not None:

            def counting(batch, predictor, inner=inner):
                calls.append(tuple(batch.shape))
                return inner(batch, predictor)

            setattr(segmenter, name, counting)
    started = time.perf_counter()
    summaries = segmenter.run()
    seconds = time.perf_counter() - started
    print(f"\nsegmented the test slide in {seconds:.1f} s ({summaries[0]['seconds']:.1f} s inside segment)")
    summary = summaries[0]
    return {
        "out": out,
        "summary": summary,
        "calls": calls,
        "windows": sum(windows),
        "flow": flow,
        "segmenter": segmenter,
    }


@pytest.fixture(scope="module")
def result(case):
    return counted_run(case, case["folder"] / "out")


def features(path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def test_level_choice_and_tile_selection(case, result):
    summary = result["summary"]
    assert summary["level"] == 1 and summary["scale"] == pytest.approx(1.0 / 1.24)
    assert tuple(summary["working_shape"]) == case["expected"].shape
    selection = summary["selection"]
    rows, cols = (math.ceil(s / TILE) for s in case["expected"].shape)
    assert selection.total == rows * cols
    assert 0 < len(selection.boxes) < selection.total  # glass tiles are skipped
    # the network ran on the tissue tiles only, once each, with the margin around the core
    assert len(result["calls"]) == len(selection.boxes)
    assert all(shape[-2:] <= (TILE + 2 * MARGIN,) * 2 for shape in result["calls"])
    assert (result["out"] / "glas_mask.tif").is_file() and (result["out"] / "glas.geojson").is_file()


def test_glass_windows_are_skipped_without_changing_the_result(case, result):
    """With ``wsi_skip_glass`` (the default) the network runs on fewer windows - the ones the summary counts as
    computed - and the mask and polygons equal those of a run over every window of the tissue tiles."""
    every = counted_run(case, case["folder"] / "every_window", wsi_skip_glass=False)
    assert every["segmenter"].glass_inferer is None and every["summary"]["windows"] == {"computed": 0, "skipped": 0}
    counted = result["summary"]["windows"]
    assert result["windows"] == counted["computed"] > 0 and counted["skipped"] > 0
    assert counted["computed"] + counted["skipped"] == every["windows"]  # the same windows, some skipped
    assert len(every["calls"]) == len(result["calls"])  # the same tiles
    with (
        tifffile.TiffFile(every["out"] / "glas_mask.tif") as a,
        tifffile.TiffFile(result["out"] / "glas_mask.tif") as b,
    ):
        np.testing.assert_array_equal(a.asarray(), b.asarray())

    def geometries(path):
        return sorted(json.dumps(f["geometry"], sort_keys=True) for f in features(path))

    assert geometries(every["out"] / "glas.geojson") == geometries(result["out"] / "glas.geojson")


def test_tta_runs_each_window_in_every_view_with_glass_skipping(case, result):
    """``--tta flips``: the same windows are computed (glass still skipped), each in 4 views; the pixel-wise network
    is flip-equivariant, so the mask is unchanged."""
    flipped = counted_run(case, case["folder"] / "tta", tta="flips")
    assert flipped["segmenter"].glass_inferer is not None
    assert flipped["summary"]["windows"] == result["summary"]["windows"]
    assert flipped["windows"] == 4 * result["windows"]
    with (
        tifffile.TiffFile(flipped["out"] / "glas_mask.tif") as a,
        tifffile.TiffFile(result["out"] / "glas_mask.tif") as b,
    ):
        np.testing.assert_array_equal(a.asarray(), b.asarray())


def test_polygons_match_the_expected_mask(case, result):
    """GeoJSON polygons (level-0 coordinates) rasterised on the working grid equal the expected mask (IoU > 0.95);
    the same polygons swapped in x/y, moved by one tile or at the level's downsample without the residual scale
    do not: the check can tell a misplaced result."""
    found = features(result["out"] / "glas.geojson")
    assert found and {f["properties"]["classification"]["name"] for f in found} == {"Gland"}
    expected, step = case["expected"], case["step"]

    def score(feats):
        return iou(rasterise(feats, expected.shape, step=(step, step)) > 0, expected)

    assert score(found) > 0.95

    def moved(transform):
        return [{"geometry": mapping(transform(shape(f["geometry"])))} for f in found]

    swapped = moved(lambda g: shapely.transform(g, lambda xy: xy[:, ::-1]))
    shifted = moved(lambda g: affinity.translate(g, TILE * step, 0))
    scaled = moved(lambda g: affinity.scale(g, 2.0 / step, 2.0 / step, origin=(0, 0)))
    for wrong in (swapped, shifted, scaled):
        assert score(wrong) < 0.95
    areas = [f["properties"]["measurements"]["Area µm^2"] for f in found]
    assert min(areas) >= MIN_OBJECT_AREA * GLAS_MPP**2 * 0.9  # small objects are removed (in µm²)


def test_pyramidal_mask_opens_everywhere_and_matches(case, result):
    path = result["out"] / "glas_mask.tif"
    height, width = case["level0"]
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions[0] == (width, height) and osr.level_count > 1
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        for level, (w, h) in enumerate(osr.level_dimensions):
            region = np.asarray(osr.read_region((0, 0), level, (min(w, 512), min(h, 512))))
            assert region.shape[2] == 4
    with tifffile.TiffFile(path) as tif:
        arrays = [level.asarray() for level in tif.series[0].levels]
    assert arrays[0].shape == (height, width) and len(arrays) > 1
    assert set(np.unique(arrays[0])) <= {0, 255}
    # level 0 against the expected working mask upsampled at level-0 pixel centres
    step = case["step"]
    rows = np.minimum(((np.arange(height) + 0.5) / step).astype(int), case["expected"].shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / step).astype(int), case["expected"].shape[1] - 1)
    upsampled = case["expected"][np.ix_(rows, cols)]
    assert iou(arrays[0] > 0, upsampled) > 0.95
    # the glass is background: outside the pasted images (plus a few pixels of blended edge), and in skipped tiles
    glass = np.ones((height, width), bool)
    for top, left, h, w in case["boxes"]:
        glass[max(top - 8, 0) : top + h + 8, max(left - 8, 0) : left + w + 8] = False
    assert not arrays[0][glass].any()
    assert arrays[0].any()
    # the reduced levels are the level above halved (nearest)
    np.testing.assert_array_equal(arrays[1], arrays[0][::2, ::2])


def test_existing_outputs_are_refused(case, result):
    with pytest.raises(BundleInputError, match="glas_mask.tif .*exists already.*--overwrite True"):
        workflow(case, result["out"]).parser.get_parsed_content("wsi_segmenter").run()


def run_cli(args: list[str], cwd) -> object:
    config = f"['{CONFIGS[0]}','{CONFIGS[1]}']"
    return run_python(["-m", "monai.bundle", "run", "--config_file", config, *args], cwd, repo_on_path=False)


def cli_options(case) -> list[str]:
    options = ["--bundle_root", str(REPO_ROOT), "--network_def", str(DARK_NETWORK).replace(" ", "")]
    options += ["--ckpt_path", str(case["checkpoint"]), "--device", "cpu"]
    for name, value in SETTINGS.items():
        options += [f"--{name}", str(value).replace(" ", "")]
    return options


def test_cli_end_to_end(case, result, tmp_path):
    """The command users type, from another folder: the same polygons as the in-process run, and the summary line."""
    out = tmp_path / "cli"
    done = run_cli(
        ["--slides", str(case["slide"]), "--output_dir", str(out), "--save_probabilities", "True", *cli_options(case)],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    selection = result["summary"]["selection"]
    line = f"glas.tif: tissue {100 * result['summary']['tissue_fraction']:.1f} % of the slide; "
    assert f"{line}{len(selection.boxes)} of {selection.total} tiles segmented ({selection.skipped} skipped)" in (
        done.stdout
    )

    def geometries(path):
        return sorted(json.dumps(f["geometry"], sort_keys=True) for f in features(path))

    assert geometries(out / "glas.geojson") == geometries(result["out"] / "glas.geojson")
    with tifffile.TiffFile(out / "glas_mask.tif") as a, tifffile.TiffFile(result["out"] / "glas_mask.tif") as b:
        np.testing.assert_array_equal(a.asarray(), b.asarray())
    with tifffile.TiffFile(out / "glas_prob.tif") as tif:
        prob = tif.asarray()
    mask = tifffile.imread(out / "glas_mask.tif")
    assert prob.shape == mask.shape and prob[mask > 0].mean() > 128  # foreground where the mask is


def test_slide_without_resolution_needs_mpp(case, tmp_path):
    done = run_cli(["--slides", str(case["nores"]), "--output_dir", str(tmp_path / "o"), *cli_options(case)], tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--mpp" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "nores_mask.tif").exists()


@pytest.mark.parametrize("scale", [1.0 / 1.24, 1.3])
def test_tiles_are_read_seamlessly(case, scale):
    """Two neighbouring working windows equal one window over both (shrinking and enlarging): no seams at tile
    borders, whatever the residual scale."""
    from bundle.wsi.segment import WorkingGrid
    from bundle.wsi.slide import Slide

    with Slide(case["slide"]) as slide:
        grid = WorkingGrid(slide, 1, scale)
        top, left = int(1320 * scale), int(1780 * scale)  # inside testA_10 (level 1: rows 1300-, columns 1750-)
        whole = grid.read(slide, top, left, 96, 160)
        first = grid.read(slide, top, left, 96, 77)
        second = grid.read(slide, top, left + 77, 96, 83)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-3)
    assert 0 <= whole.min() and whole.max() <= 255 and whole.std() > 10  # tissue, not glass
