"""Whole-slide inference: tissue megapixels per second and peak memory of the WSI path against the whole slide.

The slide (default 20000 x 20000 level-0 pixels at 0.62 µm/px, GlaS's resolution) is synthetic: ``--pieces`` (2)
elliptical tissue sections covering ``--tissue`` (30 %) of a white (off-white noise, RGB 236-247) canvas, filled
with an H&E texture - one 512-pixel tile of the embedded synthetic generator (or, with ``--glas DIR``, the first
GlaS image of ``DIR/images``) mirrored into a seamless periodic pattern. It is written as a pyramidal tiled TIFF
(the layout of ``tests/wsi_fixtures.py`` that OpenSlide reads: top-level tiled IFDs of halving size, the reduced ones
``subfiletype=1``, resolution in pixels per cm) tile by tile, from an iterator, so the generator's memory does not
grow with the slide; each level is drawn directly at its own resolution (the texture pre-shrunk by 2x2 means, the
sections tested at the level-0 position of each pixel's centre). The generator counts the tissue pixels it writes
at level 0: that is the slide's true tissue area (printed next to the requested one and the ellipses' area).

Two methods segment it, each in its own child process (``--child METHOD``), with the same network
(``configs/inference.json``'s ``network_def``, ``--network tiny`` for smoke runs) and weights, the same working
resolution, window (the config's ``patch_size``, ``--overlap``, ``--sw-batch-size``), tile/block (1024 working
pixels) and margin (64 working pixels), and the clean-up off (``min_object_area`` 0, ``fill_holes`` false):

- ``wsi``: ``configs/inference.json`` + ``configs/inference_wsi.json``'s ``wsi_segmenter``
  (:class:`bundle.wsi.segment.SlideSegmenter`) on the slide: it works at ``0.62 / image_scale`` µm/px (config
  ``image_scale`` 0.5: 1.24 µm/px, so it reads pyramid level 1 with residual scale 1), detects the tissue on a
  low-resolution level and segments only the tiles with tissue, and within them only the sliding windows that
  touch tissue (``wsi_skip_glass``, the default); outputs the pyramidal mask TIFF (level-0 size) and
  the GeoJSON of the glands;
- ``whole``: the bundle's large-image path (``large_images``: :class:`bundle.inference.LargeImageSegmenter`) on the
  WHOLE slide at the same working resolution: level 1 of the slide (the very pixels the WSI path reads) written once
  as a plain tiled TIFF, segmented with ``image_scale`` 1 (the config's ``ScaledInferer`` then passes the blocks
  straight to the same ``SlidingWindowInferer``), block 1024 with margin 64; output the mask TIFF (level-1 size).

Timed: from the slide file on disk to the outputs on disk, after a warm-up forward (the WSI time includes the
tissue detection and the pyramid/GeoJSON writing). Peak memory: each child reports its RSS after building the
network (baseline) and its peak RSS during the run (Linux ``VmHWM``, reset before it); "+run" is the difference.
Figures per slide size: seconds; tissue MP/s (level-0 tissue megapixels / s) and whole-slide MP/s (level-0 slide
megapixels / s); speed-up (whole-slide seconds / WSI seconds); peak and +run RSS; output sizes; tiles segmented,
skipped and in all (the whole-slide path: blocks); the network's windows (counted by a forward hook) and the WSI
path's glass windows skipped; two speed-up bounds, all tiles / tissue tiles (what skipping tiles alone would give)
and the network's windows, whole slide / WSI (what skipping tiles and glass windows can give at most: a window costs
the same on both paths; the WSI path adds the tissue detection, the GeoJSON and the pyramid). The tiles are 1024
working pixels = 2048 level-0 pixels, coarse next to a 20000-pixel slide (10 x 10 tiles): with the default two
sections 45 of the 100 tiles hold tissue, a tile bound of 2.2, which the window skipping (128-pixel windows) lifts
close to 1 / tissue share. Small smoke sizes (at most ~4 tiles a side) skip no tile, only glass windows. The
weights are ``--weights`` if given, else a seeded initialisation fitted for ``--fit-steps`` AdamW steps on the
texture tile beside a band of the slide's glass as background, at the working resolution (as
``benchmarks/inference.py`` does), so that the masks are informative. The two masks are compared on the tiles the
WSI path segmented (IoU of the foreground, at the working resolution): both run the same network on the same windows
of the same pixels (glass windows aside, which both call background), so they agree exactly inside the slide; only
a tile at the slide's edge may differ a little (the WSI path pads its window with white off the slide, the block
path clips it, so the windows there sit differently) - the synthetic sections stay away from the edges.

Checks (PASS/FAIL, the exit status stays 0): the WSI path is at least ``--target-speedup`` (2.5) times faster than
the whole slide at every size; with two or more ``--sizes``, the WSI peak RSS at the largest size is within
``--memory-ratio`` (1.3) times that at the smallest (memory does not grow with the slide); the masks agree on the
tissue tiles (IoU > 0.99, with a foreground share of the WSI mask on them within [5 %, 95 %], or the IoU says
nothing).

Figures for ``docs/benchmarks.md`` (2 CPU cores, default network):

    python benchmarks/wsi.py --threads 2 --sizes 20000 10000 --json runs/wsi.json

Smoke test: ``python benchmarks/wsi.py --network tiny --sizes 8000 4000 --fit-steps 30``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from benchmarks.network_sizes import TINY_NETWORK  # noqa: E402
from benchmarks.process_memory import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

METHODS = ("wsi", "whole")
SLIDE_MPP = 0.62  # µm per level-0 pixel: GlaS's resolution
TILE = 256  # TIFF tile side of the synthetic slide
WORK_TILE = 1024  # WSI tile side = block side of the whole-slide path (working pixels)
MARGIN = 64  # context around each tile/block (working pixels)
MIN_IOU = 0.99
FOREGROUND_RANGE = (0.05, 0.95)
CONFIG_FILES = (BUNDLE_ROOT / "configs" / "inference.json", BUNDLE_ROOT / "configs" / "inference_wsi.json")


# ------------------------------------------------------------------------------------------------ the slide


def texture_tile(glas: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """An H&E tile (H, W, 3) uint8, its gland mask (H, W) bool and a description."""
    if glas:
        from PIL import Image

        root = Path(glas)
        files = sorted((root / "images").glob("*.png")) + sorted((root / "images").glob("*.bmp"))
        if not files or not (root / "masks" / files[0].name).is_file():
            raise SystemExit(f"error: {root} needs images/*.png and masks/<same name> (this repository's GlaS copy)")
        tile = np.asarray(Image.open(files[0]).convert("RGB"))
        mask = np.asarray(Image.open(root / "masks" / files[0].name).convert("L")) > 0
        return tile, mask, f"{files[0].name} of {root}"
    from bundle.prepare.synthetic import render_synthetic_case

    tile, mask = render_synthetic_case(seed=0, index=0, image_size=512)
    return tile, mask > 0, "synthetic 512 px tile"


def mirrored_period(tile: np.ndarray, multiple: int) -> np.ndarray:
    """``tile`` and its mirror images (2H x 2W: seamless when repeated), cut to a multiple of ``multiple``."""
    period = np.concatenate([tile, tile[::-1]], axis=0)
    period = np.concatenate([period, period[:, ::-1]], axis=1)
    h, w = period.shape[0] // multiple * multiple, period.shape[1] // multiple * multiple
    return np.ascontiguousarray(period[:h, :w])


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` reduced by ``factor`` x ``factor`` block means (sides divisible by ``factor``)."""
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image.reshape(h, factor, w, factor, -1).astype(np.float32).mean(axis=(1, 3))
    return np.round(blocks).astype(image.dtype).reshape(h, w, *image.shape[2:])


def sections(height: int, width: int, tissue: float, pieces: int) -> list[tuple[float, float, float, float]]:
    """``pieces`` ellipses ``(cy, cx, ry, rx)`` (level-0 pixels) side by side, covering ``tissue`` of the slide.

    Each sits at the centre of its vertical strip with axes in the strip's proportions; they must fit inside the
    strip with a margin (at most ~55 % tissue), so no section touches the slide's edge.
    """
    strip = width / pieces
    area = tissue * height * width / pieces
    ratio = height / strip  # ry / rx
    rx = math.sqrt(area / (math.pi * ratio))
    ry = rx * ratio
    if rx > 0.45 * strip or ry > 0.45 * height:
        raise SystemExit(f"error: --tissue {tissue} does not fit in {pieces} sections (at most ~0.6)")
    return [(height / 2, strip * (i + 0.5), ry, rx) for i in range(pieces)]


def tissue_at(ys: np.ndarray, xs: np.ndarray, ellipses) -> np.ndarray:
    """Boolean (len(ys), len(xs)): level-0 positions inside a section."""
    inside = np.zeros((len(ys), len(xs)), bool)
    for cy, cx, ry, rx in ellipses:
        inside |= ((ys[:, None] - cy) / ry) ** 2 + ((xs[None, :] - cx) / rx) ** 2 <= 1.0
    return inside


class SyntheticSlide:
    """The slide's levels drawn tile by tile: tissue texture inside the sections, off-white glass outside."""

    def __init__(self, height: int, width: int, tissue: float, pieces: int, tile: np.ndarray, min_side: int = 512):
        self.height, self.width = height, width
        self.ellipses = sections(height, width, tissue, pieces)
        self.shapes = [(height, width)]
        while max(self.shapes[-1]) > min_side:
            h, w = self.shapes[-1]
            self.shapes.append((h // 2, w // 2))
        period = mirrored_period(tile, 2 ** (len(self.shapes) - 1))
        self.textures = [shrink(period, 2**k) for k in range(len(self.shapes))]
        self.tissue_pixels = 0  # counted while level 0 is drawn

    def ellipse_fraction(self) -> float:
        return sum(math.pi * ry * rx for _, _, ry, rx in self.ellipses) / (self.height * self.width)

    def draw(self, level: int, top: int, left: int, rows: int, cols: int) -> np.ndarray:
        """Pixels ``[top, top + rows) x [left, left + cols)`` of ``level`` (inside the level's shape)."""
        ds = 2**level
        ys = (np.arange(top, top + rows) + 0.5) * ds
        xs = (np.arange(left, left + cols) + 0.5) * ds
        inside = tissue_at(ys, xs, self.ellipses)
        texture = self.textures[level]
        rows_i = np.arange(top, top + rows) % texture.shape[0]
        cols_i = np.arange(left, left + cols) % texture.shape[1]
        rng = np.random.default_rng([level, top, left])
        out = (236 + rng.integers(0, 12, (rows, cols, 3), dtype=np.uint8)).astype(np.uint8)
        out[inside] = texture[np.ix_(rows_i, cols_i)][inside]
        if level == 0:
            self.tissue_pixels += int(inside.sum())
        return out

    def tiles(self, level: int) -> Iterator[np.ndarray]:
        """The level's TIFF tiles in row-major order, each ``TILE`` x ``TILE`` (edge tiles padded)."""
        h, w = self.shapes[level]
        for top in range(0, h, TILE):
            for left in range(0, w, TILE):
                rows, cols = min(TILE, h - top), min(TILE, w - left)
                tile = np.zeros((TILE, TILE, 3), np.uint8)
                tile[:rows, :cols] = self.draw(level, top, left, rows, cols)
                yield tile


def write_slide(path: str, slide: SyntheticSlide, level1_path: str) -> None:
    """The pyramidal slide (OpenSlide's generic-tiff layout) and its level 1 as a plain tiled TIFF."""
    common = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "zlib", "compressionargs": {"level": 1}}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level, shape in enumerate(slide.shapes):
            mpp = SLIDE_MPP * 2**level
            tw.write(
                slide.tiles(level),
                shape=(*shape, 3),
                dtype=np.uint8,
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                **common,
            )
    with tifffile.TiffWriter(level1_path, bigtiff=True) as tw:
        tw.write(slide.tiles(1), shape=(*slide.shapes[1], 3), dtype=np.uint8, **common)


# ------------------------------------------------------------------------------------------------ the methods


def config_parser(args: argparse.Namespace, **updates):
    """``configs/inference.json`` + ``configs/inference_wsi.json`` with the benchmark's settings and ``updates``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in CONFIG_FILES])
    parser.update(
        {
            "bundle_root": str(BUNDLE_ROOT),
            "min_object_area": 0,  # no clean-up: the masks compare the network's decisions only
            "fill_holes": False,
            "sw_overlap": args.overlap,
            "sw_batch_size": args.sw_batch_size,
            "progress": False,
            "device": f"$torch.device({args.device!r})",
            **(TINY_NETWORK if args.network == "tiny" else {}),
            **updates,
        }
    )
    return parser


def fit_weights(args: argparse.Namespace, folder: str) -> tuple[str, str]:
    """The weights file both methods load, and what it holds."""
    if args.weights:
        return args.weights, args.weights
    from benchmarks.inference import fit

    parser = config_parser(args)
    roi = int(parser.get_parsed_content("patch_size")[0])
    scale = float(parser.get_parsed_content("image_scale"))
    tile, mask, _ = texture_tile(args.glas)
    factor = max(1, round(1 / scale))  # the working resolution: the config's image_scale (0.5: 2x2 means)
    period = mirrored_period(tile, factor)
    image = shrink(period, factor).astype(np.float32) / 255.0
    # a band of the slide's glass beside it, as background: a trained model calls glass background (GlaS has white
    # lumens and margins), which the WSI path's skipped glass windows are too; weights fitted on tissue alone call
    # the glass anything, and the two methods would differ on it for that reason only
    glass = np.random.default_rng(0).integers(236, 248, (image.shape[0], image.shape[1] // 2, 3)) / 255.0
    image = np.concatenate([image, glass.astype(np.float32)], axis=1)
    mean = np.asarray(parser.get_parsed_content("intensity_mean"), np.float32)
    std = np.asarray(parser.get_parsed_content("intensity_std"), np.float32)
    inputs = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1).copy())
    target = mirrored_period(mask[..., None], factor)[::factor, ::factor, 0]
    target = torch.from_numpy(np.concatenate([target, np.zeros((target.shape[0], glass.shape[1]), bool)], axis=1))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    fit(network, inputs, target, roi, args.fit_steps, args.fit_lr)
    path = os.path.join(folder, "fitted_weights.pt")
    torch.save(network.state_dict(), path)
    return (
        path,
        f"seed 0 + {args.fit_steps} AdamW steps (lr {args.fit_lr:g} -> 0) on the texture tile and a band of glass",
    )


def build(args: argparse.Namespace, out_dir: str):
    """The method's segmenter (network with the weights loaded) and what ``segment`` is called with."""
    from bundle.inference import load_network_weights

    if args.child == "wsi":
        parser = config_parser(
            args,
            slides=args.slide,
            output_dir=out_dir,
            ckpt_path=args.weights_file,
            wsi_tile_size=WORK_TILE,
            wsi_margin=MARGIN,
            wsi_backend=args.backend,
        )
        segmenter = parser.get_parsed_content("wsi_segmenter")
        target = args.slide
    else:
        parser = config_parser(
            args,
            dataset_dir=args.level1,
            output_dir=out_dir,
            ckpt_path=args.weights_file,
            image_scale=1.0,  # the TIFF is at the working resolution already
            large_image_pixels=1,  # the block path takes the image whatever its size
            large_image_block=WORK_TILE,
            large_image_margin=MARGIN,
            mask_scale=1,
        )
        segmenter = parser.get_parsed_content("large_images")
        target = args.level1
    load_network_weights(segmenter.network, args.weights_file).eval()
    return segmenter, target


def child(args: argparse.Namespace) -> dict:
    """One method in this (child) process: build, warm up, measure; the outputs stay in ``--out-dir``."""
    segmenter, target = build(args, args.out_dir)
    roi = int(max(getattr(segmenter.inferer, "roi_size", None) or (128,)))
    with torch.no_grad():
        segmenter.network(torch.zeros(args.sw_batch_size, 3, roi, roi, device=args.device))
    windows = []  # the network's batch sizes: the windows it ran
    segmenter.network.register_forward_hook(lambda module, inputs, output: windows.append(inputs[0].shape[0]))
    reset_peak_rss()
    result: dict = {"baseline_rss_mb": rss_mb()}
    start = time.perf_counter()
    summary = segmenter.segment(target)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    result["above_baseline_mb"] = result["peak_rss_mb"] - result["baseline_rss_mb"]
    result["windows"] = int(sum(windows))
    if args.child == "wsi":
        selection = summary["selection"]
        result.update(
            mask=summary["mask"],
            geojson=summary["geojson"],
            level=summary["level"],
            scale=summary["scale"],
            detected_tissue=summary["tissue_fraction"],
            glass_windows=summary["windows"]["skipped"],
            segmented=len(selection.boxes),
            skipped=selection.skipped,
            total=selection.total,
            # working-grid origins of the tiles segmented (for the mask comparison)
            boxes=[[int(v) for v in box] for box in selection.boxes],
        )
    else:
        height, width = tifffile.TiffFile(target).pages[0].shape[:2]
        blocks = math.ceil(height / WORK_TILE) * math.ceil(width / WORK_TILE)
        result.update(mask=summary, segmented=blocks, skipped=0, total=blocks)
    return result


def child_command(args: argparse.Namespace, method: str, slide: str, level1: str, weights: str, out: str) -> list:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--slide", slide, "--level1", level1]
    command += ["--weights-file", weights, "--out-dir", out, "--device", args.device, "--network", args.network]
    command += ["--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size), "--backend", args.backend]
    return command + (["--threads", str(args.threads)] if args.threads else [])


# ------------------------------------------------------------------------------------------------ measuring


def working_mask(path: str, level: int) -> np.ndarray:
    """Foreground (bool) of a mask TIFF's ``level`` (the WSI mask's level 1 is its working grid: each working pixel
    is a constant 2 x 2 block at level 0, which the nearest reduction keeps)."""
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        if level < len(levels):
            return levels[level].asarray() > 0
        return levels[0].asarray()[:: 2**level, :: 2**level] > 0


def compare(wsi: dict, whole: dict, step: float) -> dict:
    """IoU and agreement of the two foregrounds on the tiles the WSI path segmented (working resolution)."""
    a = working_mask(wsi["mask"], 1 if step == 2 else 0)
    b = working_mask(whole["mask"], 0)
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    inter = union = same = count = fg = 0
    for y0, x0, bh, bw in wsi["boxes"]:  # level-0 boxes -> working pixels
        ys = slice(int(round(y0 / step)), min(int(round((y0 + bh) / step)), h))
        xs = slice(int(round(x0 / step)), min(int(round((x0 + bw) / step)), w))
        ta, tb = a[ys, xs], b[ys, xs]
        inter += int((ta & tb).sum())
        union += int((ta | tb).sum())
        same += int((ta == tb).sum())
        count += ta.size
        fg += int(ta.sum())
    return {
        "iou": inter / union if union else 1.0,
        "agreement": same / count if count else 1.0,
        "wsi_foreground_share": fg / count if count else 0.0,
    }


def file_mb(path: str) -> float:
    return os.path.getsize(path) / 2**20


def measure_size(args: argparse.Namespace, size: int, folder: str, weights: str, tile: np.ndarray) -> dict:
    height, width = size, size
    slide = SyntheticSlide(height, width, args.tissue, args.pieces, tile)
    slide_path, level1_path = os.path.join(folder, f"slide_{size}.tif"), os.path.join(folder, f"level1_{size}.tif")
    start = time.perf_counter()
    write_slide(slide_path, slide, level1_path)
    write_seconds = time.perf_counter() - start
    megapixels = height * width / 1e6
    tissue_mp = slide.tissue_pixels / 1e6
    runs = {}
    for method in METHODS:
        out = os.path.join(folder, f"{method}_{size}")
        command = child_command(args, method, slide_path, level1_path, weights, out)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"error: the {method} child failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["tissue_mp_per_s"] = tissue_mp / result["seconds"]
        result["slide_mp_per_s"] = megapixels / result["seconds"]
        result["mask_mb"] = file_mb(result["mask"])
        if method == "wsi":
            result["geojson_mb"] = file_mb(result["geojson"])
        runs[method] = result
    agreement = compare(runs["wsi"], runs["whole"], 2.0)
    for result in runs.values():
        result.pop("boxes", None)
    return {
        "height": height,
        "width": width,
        "megapixels": megapixels,
        "tissue_megapixels": tissue_mp,
        "tissue_fraction": slide.tissue_pixels / (height * width),
        "ellipse_fraction": slide.ellipse_fraction(),
        "requested_tissue": args.tissue,
        "levels": len(slide.shapes),
        "slide_mb": file_mb(slide_path),
        "write_seconds": write_seconds,
        "methods": runs,
        "speedup": runs["whole"]["seconds"] / runs["wsi"]["seconds"],
        # the most the tile skipping can give: all tiles / tiles segmented (same cost per tile)
        "tile_bound": runs["wsi"]["total"] / max(runs["wsi"]["segmented"], 1),
        # the most skipping glass tiles and glass windows can give: the network's windows, whole / WSI
        "window_bound": runs["whole"]["windows"] / max(runs["wsi"]["windows"], 1),
        **agreement,
    }


def checks(figures: dict, args: argparse.Namespace) -> list[dict]:
    result = []
    for run in figures["sizes"]:
        result.append(
            {
                "name": f"{run['height']}x{run['width']}: WSI at least {args.target_speedup:g}x faster than the whole "
                "slide",
                "value": f"{run['speedup']:.2f}x",
                "pass": bool(run["speedup"] >= args.target_speedup),
                "fails_because": f"skipping glass can give at most {run['window_bound']:.2f}x here (the network's "
                "windows, whole slide / WSI), less the tissue detection, GeoJSON and pyramid",
            }
        )
        low, high = FOREGROUND_RANGE
        share = run["wsi_foreground_share"]
        result.append(
            {
                "name": f"{run['height']}x{run['width']}: masks agree on the tissue tiles (IoU > {MIN_IOU})",
                "value": f"IoU {run['iou']:.4f}, WSI foreground {100 * share:.1f} %",
                "pass": bool(run["iou"] > MIN_IOU and low <= share <= high),
                "fails_because": "different decisions, or a (nearly) constant prediction that agrees trivially",
            }
        )
    if len(figures["sizes"]) > 1:
        by_size = sorted(figures["sizes"], key=lambda r: r["megapixels"])
        small, large = by_size[0]["methods"]["wsi"], by_size[-1]["methods"]["wsi"]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        result.append(
            {
                "name": f"WSI peak RSS at {by_size[-1]['height']} within {args.memory_ratio:g}x of that at "
                f"{by_size[0]['height']}",
                "value": f"{ratio:.2f}x",
                "pass": bool(ratio <= args.memory_ratio),
                "fails_because": "the WSI path's memory grows with the slide",
            }
        )
    return result


def print_table(figures: dict) -> None:
    print(
        f"{'size':>11} {'method':<6} {'s':>8} {'tissue MP/s':>11} {'slide MP/s':>10} {'speed-up':>8} "
        f"{'peak MB':>8} {'+run MB':>8} {'mask MB':>8} {'json MB':>8} {'tiles':>5} {'skipped':>7} {'total':>5} "
        f"{'windows':>8}"
    )
    for run in figures["sizes"]:
        size = f"{run['height']}x{run['width']}"
        for method, r in run["methods"].items():
            speedup = run["speedup"] if method == "wsi" else 1.0
            geojson = f"{r['geojson_mb']:.2f}" if "geojson_mb" in r else "-"
            print(
                f"{size:>11} {method:<6} {r['seconds']:>8.2f} {r['tissue_mp_per_s']:>11.3f} "
                f"{r['slide_mp_per_s']:>10.3f} {speedup:>8.2f} {r['peak_rss_mb']:>8.0f} {r['above_baseline_mb']:>8.0f} "
                f"{r['mask_mb']:>8.2f} {geojson:>8} {r['segmented']:>5} {r['skipped']:>7} {r['total']:>5} "
                f"{r['windows']:>8}"
            )
        wsi = run["methods"]["wsi"]
        print(
            f"{'':>11} tissue {100 * run['tissue_fraction']:.1f} % drawn (ellipses {100 * run['ellipse_fraction']:.1f} "
            f"%, requested {100 * run['requested_tissue']:.0f} %, detected {100 * wsi['detected_tissue']:.1f} %); "
            f"{run['tissue_megapixels']:.1f} of {run['megapixels']:.1f} MP; speed-up bound: tiles / tissue tiles "
            f"{run['tile_bound']:.2f}, network windows whole / WSI {run['window_bound']:.2f} ("
            f"{wsi['glass_windows']} glass windows skipped in tissue tiles); WSI level {wsi['level']} scale "
            f"{wsi['scale']:.3f}; IoU on tissue tiles {run['iou']:.4f}; slide {run['slide_mb']:.1f} MB, "
            f"{run['levels']} levels, written in {run['write_seconds']:.1f} s"
        )
    print(
        f"({figures['texture']}; {figures['network']} network, weights {figures['weights']}; window "
        f"{figures['roi']} at {figures['working_mpp']:.2f} µm/px, overlap {figures['overlap']}, sw_batch_size "
        f"{figures['sw_batch_size']}; tiles/blocks {WORK_TILE} + margin {MARGIN} working px; device "
        f"{figures['device']}, torch threads {figures['threads']}; memory: RSS, one child process per run; "
        "whole = LargeImageSegmenter on the slide's level 1)"
    )
    for check in figures["checks"]:
        why = "" if check["pass"] else f" - {check['fails_because']}"
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {check['value']}{why}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000], help="slide sides (level-0 pixels)")
    parser.add_argument("--tissue", type=float, default=0.3, help="tissue share of the slide")
    parser.add_argument("--pieces", type=int, default=2, help="tissue sections (ellipses side by side)")
    parser.add_argument("--glas", help="a GlaS folder (images/*.png): its first image as the tissue texture")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (config: 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=8)
    parser.add_argument("--backend", default="auto", help="WSI slide reader (auto, openslide, tifffile, cucim)")
    parser.add_argument("--network", choices=["default", "tiny"], default="default")
    parser.add_argument("--weights", help="network weights, e.g. models/model.pt (default: fitted, see above)")
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--fit-lr", type=float, default=3e-3)
    parser.add_argument("--target-speedup", type=float, default=2.5)
    parser.add_argument("--memory-ratio", type=float, default=1.3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", help="write the slides and outputs to this folder (kept) instead of a temporary one")
    for hidden in ("--child", "--slide", "--level1", "--weights-file", "--out-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.tissue < 1 or args.pieces < 1 or min(args.sizes) < 1024:
        parser.error("--tissue must be in (0, 1), --pieces >= 1 and every --sizes at least 1024")
    if not 0 <= args.overlap < 1:
        parser.error("--overlap must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = child(args)
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or temporary
        os.makedirs(folder, exist_ok=True)
        weights_file, weights = fit_weights(args, folder)
        tile, _, texture = texture_tile(args.glas)
        sizes = [measure_size(args, size, folder, weights_file, tile) for size in args.sizes]
    parser = config_parser(args)
    figures = {
        "sizes": sizes,
        "texture": texture,
        "network": args.network,
        "weights": weights,
        "roi": int(parser.get_parsed_content("patch_size")[0]),
        "working_mpp": SLIDE_MPP / float(parser.get_parsed_content("image_scale")),
        "overlap": args.overlap,
        "sw_batch_size": args.sw_batch_size,
        "device": args.device,
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
    }
    figures["checks"] = checks(figures, args)
    print_table(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
