"""Whole-slide segmentation: tissue tiles at the model's resolution, gland polygons and a pyramidal mask per slide.

Why tiles on a working grid: the model was trained at one resolution (``model_mpp``), so each slide is read at the
pyramid level chosen by :meth:`~bundle.wsi.slide.Slide.choose_level` and resized by the residual scale ``s``; the
*working grid* is that level's pixel grid times ``s``, and every prediction lives on it. Working pixel ``j`` covers
level-0 pixels ``[j * d / s, (j + 1) * d / s)`` (``d`` the level's downsample).

Per slide (:meth:`SlideSegmenter.segment`):

1. tissue is detected on a low-resolution level; only working tiles whose core touches tissue are computed;
2. each tile is read with ``margin`` working pixels of context and resampled onto the working grid with weights that
   depend on global coordinates only (:func:`resample_weights`: pixel-area averaging when shrinking, bilinear when
   enlarging), so neighbouring tiles agree exactly and there are no seams;
3. the config's raw sliding-window inferer runs on the normalised window; softmax, argmax, then the clean-up
   (:class:`~bundle.inference.cleanup.MaskCleanup`) on the whole window, so an object crossing the core's edge is
   judged on what the window holds (as in :class:`~bundle.inference.large_images.LargeImageSegmenter`); the core
   goes to the :class:`~bundle.wsi.geojson.PolygonCollector` (objects cut by tile borders are merged there) and,
   upsampled (nearest, at level-0 pixel centres), to the :class:`~bundle.wsi.pyramid.PyramidWriter`.

``min_object_area`` is in pixels of the training images (GlaS, 0.62 µm/px), as for whole images; it is converted to
working pixels through µm². Holes are filled within the tile's window (a hole wider than the margin that crosses a
tile border stays open). Memory stays at a few tiles: nothing of slide size is allocated except the low-resolution
tissue mask, and the polygons.

Resuming (``--resume true``): while a slide runs, ``<output_dir>/.<stem>.partial/`` holds ``manifest.json`` (what
decides the result: the slide file, level, scale, tile settings, clean-up, inferer, checkpoint file) and one
``tile_<top>_<left>.npz`` per finished tile (its core classes, and its probabilities as the 8-bit values the
probability TIFF stores), each written under a temporary name and renamed when complete, so a kill loses at most the
tile in progress. A resumed run replays the stored tiles, in the same order, into fresh writers and collector and
computes only the others, so its outputs equal an uninterrupted run's; the folder is removed when the slide's
outputs are written. A different manifest is refused (``--overwrite True`` starts the slide again), and so is a
leftover folder without ``--resume true``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse
from tqdm import tqdm

from ..errors import BundleInputError
from ..inference.checkpoint import CheckpointWeightsLoader
from ..inference.cleanup import MaskCleanup
from ..inference.large_images import first_argmax
from ..inference.tta import FlipAveraging, check_tta
from ..inference.writers import temporary_name, to_output_dtype
from ..options import as_switch
from .geojson import PolygonCollector
from .glass_windows import GlassWindowPredictor, coordinate_inferer
from .pyramid import PyramidWriter
from .slide import BACKENDS, GLAS_MPP, Slide, model_mpp
from .tissue import TileSelection, detect_tissue

__all__ = ["SLIDE_SUFFIXES", "SlideSegmenter", "WorkingGrid", "list_slides", "resample_weights"]

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".vms", ".bif")
OUTPUT_POSTFIXES = ("_mask.tif", "_prob.tif")


def list_slides(source: str | os.PathLike | None, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The slide ``source`` or the slides in the folder ``source`` (not recursive), sorted.

    Files in ``exclude`` (the output folder) that look like this pipeline's own outputs are left out, so a run into
    the slides' own folder does not take last run's masks for slides.
    """
    if source is None or str(source) == "":
        raise BundleInputError("no slides given: pass --slides (a slide file or a folder of slides)")
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BundleInputError(f"--slides {path} does not exist (expected a slide file or a folder of slides)")
    out_dir = Path(exclude).resolve() if exclude is not None else None
    found = []
    for item in sorted(path.iterdir()):
        if not item.is_file() or item.name.startswith(".") or item.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        if out_dir is not None and item.parent.resolve() == out_dir and item.name.endswith(OUTPUT_POSTFIXES):
            continue
        found.append(item)
    if not found:
        raise BundleInputError(f"no slides in the folder {path} (supported: {', '.join(SLIDE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for item in found:
        if item.stem in stems:
            raise BundleInputError(
                f"{stems[item.stem].name} and {item.name} would write the same outputs ({item.stem}_mask.tif); "
                "segment them into different --output_dir folders"
            )
        stems[item.stem] = item
    return found


def resample_weights(start: int, count: int, scale: float, src_start: int, src_count: int) -> sparse.csr_matrix:
    """``(count, src_count)`` weights taking source pixels ``src_start + i`` to working pixels ``start + j``.

    Working pixel ``j`` covers source ``[j / scale, (j + 1) / scale)``. Shrinking (``scale < 1``) averages the source
    pixels by their overlap with that footprint (no aliasing of nuclei); enlarging interpolates bilinearly at the
    footprint's centre (edge pixels repeated). Weights depend on global positions only, so tiles agree where they
    overlap. Rows are normalised; source pixels outside ``[src_start, src_start + src_count)`` are never used.
    """
    entries: list[tuple[int, int, float]] = []
    last = src_start + src_count - 1
    for j in range(start, start + count):
        if scale < 1.0:
            lo, hi = j / scale, (j + 1) / scale
            for i in range(max(int(math.floor(lo)), src_start), min(int(math.ceil(hi)), last + 1)):
                weight = min(hi, i + 1) - max(lo, i)
                if weight > 1e-9:
                    entries.append((j - start, i - src_start, weight))
        else:
            centre = (j + 0.5) / scale - 0.5
            base = int(math.floor(centre))
            frac = centre - base
            for i, weight in ((base, 1.0 - frac), (base + 1, frac)):
                if weight > 1e-9:
                    entries.append((j - start, min(max(i, src_start), last) - src_start, weight))
    rows, cols, vals = zip(*entries) if entries else ((), (), ())
    matrix = sparse.csr_matrix((vals, (rows, cols)), shape=(count, src_count), dtype=np.float32)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    if np.any(totals <= 0):
        raise ValueError("the source window does not cover the working window")
    return sparse.diags(1.0 / totals).astype(np.float32) @ matrix


class WorkingGrid:
    """The working grid of one slide: a level resized by ``scale``, and its mapping to level-0 pixels."""

    def __init__(self, slide: Slide, level: int, scale: float) -> None:
        lv = slide.level(level)
        self.level, self.scale = level, float(scale)
        self.downsample = lv.downsample  # (y, x) level-0 pixels per level pixel
        self.level_shape = (lv.height, lv.width)
        self.shape = (max(1, math.ceil(lv.height * scale)), max(1, math.ceil(lv.width * scale)))
        self.level0_shape = (slide.levels[0].height, slide.levels[0].width)
        # level-0 pixels per working pixel (y, x)
        self.step = (self.downsample[0] / self.scale, self.downsample[1] / self.scale)

    def level0_range(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        """Level-0 pixels whose centres fall in working pixels ``[start, stop)`` along ``axis`` (0: y, 1: x)."""
        step, size = self.step[axis], self.level0_shape[axis]
        first = min(max(math.ceil(start * step - 0.5), 0), size)
        last = min(max(math.ceil(stop * step - 0.5), 0), size)
        return first, last

    def working_index(self, first: int, last: int, axis: int) -> np.ndarray:
        """The working pixel under the centre of each level-0 pixel ``first..last-1`` along ``axis``."""
        return np.floor((np.arange(first, last) + 0.5) / self.step[axis]).astype(np.int64)

    def read(self, slide: Slide, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The working-grid window ``(height, width, 3)`` float32 at ``(top, left)`` (parts off the slide white)."""
        if self.scale == 1.0:
            return slide.read(self.level, top, left, height, width).astype(np.float32)
        s = self.scale
        y0, x0 = math.floor(top / s) - 1, math.floor(left / s) - 1
        y1, x1 = math.ceil((top + height) / s) + 1, math.ceil((left + width) / s) + 1
        source = slide.read(self.level, y0, x0, y1 - y0, x1 - x0).astype(np.float32)
        wy = resample_weights(top, height, s, y0, y1 - y0)
        wx = resample_weights(left, width, s, x0, x1 - x0)
        rows = wy @ source.reshape(y1 - y0, -1)  # (height, src_w * 3)
        rows = rows.reshape(height, x1 - x0, 3).transpose(1, 0, 2).reshape(x1 - x0, -1)
        return np.ascontiguousarray((wx @ rows).reshape(width, height, 3).transpose(1, 0, 2), dtype=np.float32)


class SlideSegmenter:
    """Segment whole-slide images tile by tile; writes ``<stem>_mask.tif``, ``<stem>.geojson`` (and ``_prob.tif``).

    Args:
        slides: a slide file or a folder of slides (:data:`SLIDE_SUFFIXES`).
        network: the segmentation network (weights loaded through ``weights`` first when given).
        inferer: the raw sliding-window inferer (``@sliding_window_inferer``: no ``image_scale`` resize, the level
            choice and the residual scale do that), called as ``inferer(batch, predictor)``.
        intensity_mean, intensity_std: per-channel normalisation of [0, 1] RGB, as the training preprocessing.
        output_dir: where the outputs go (created).
        image_scale: the model's ``image_scale``; the model works at ``GlaS 0.62 µm/px / image_scale``.
        model_mpp: µm per pixel the model works at, overriding the one derived from ``image_scale``.
        tile_size: tile side on the working grid; ``margin``: context read around each tile (working pixels).
        min_object_area: objects below this many pixels at the training images' resolution are removed.
        fill_holes: fill holes enclosed by a class (within the tile's window).
        num_classes: the network's classes (background first); the mask stores class k as ``k * mask_scale``.
        mpp: µm per level-0 pixel overriding the slides' own (``--mpp``), a number or ``(y, x)``.
        backend: slide reader (``auto``, ``openslide``, ``tifffile``, ``cucim``).
        weights: a :class:`~bundle.inference.checkpoint.CheckpointWeightsLoader` whose ``load()`` runs first.
        device, amp: where tiles run; autocast on CUDA.
        overwrite: replace existing outputs (otherwise the run stops before any work).
        save_probabilities: also write ``<stem>_prob.tif``, the foreground probability ``1 - p(background)``.
        progress: a tqdm bar over the tissue tiles of each slide.
        mask_tile: tile side of the pyramidal TIFFs.
        resume: continue slides a killed run left unfinished (their ``.<stem>.partial`` folder), skipping the slides
            whose outputs are complete; ``True``/``False`` or the text ``"true"``/``"false"``.
        skip_glass: inside a tissue tile, run the network only on the sliding windows that touch tissue (the others
            are background; :mod:`bundle.wsi.glass_windows`); needs a plain ``SlidingWindowInferer``.
        tta: test-time augmentation of every window (``"none"``, ``"flips"``, ``"dihedral"``:
            :mod:`bundle.inference.tta`), as in the other inference paths.
    """

    def __init__(
        self,
        slides: str | os.PathLike | None,
        network: torch.nn.Module,
        inferer: Any,
        intensity_mean: Sequence[float],
        intensity_std: Sequence[float],
        output_dir: str | os.PathLike,
        image_scale: float = 1.0,
        model_mpp: float | None = None,
        tile_size: int = 1024,
        margin: int = 64,
        min_object_area: int = 0,
        fill_holes: bool = False,
        num_classes: int = 2,
        mpp: float | Sequence[float] | None = None,
        backend: str = "auto",
        weights: CheckpointWeightsLoader | None = None,
        device: str | torch.device = "cpu",
        amp: bool = False,
        overwrite: bool = False,
        save_probabilities: bool = False,
        progress: bool = True,
        mask_tile: int = 256,
        resume: bool | str = False,
        skip_glass: bool | str = True,
        tta: str = "none",
    ) -> None:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 16:
            raise BundleInputError(f"--wsi_tile_size must be a whole number >= 16 (working pixels), got {tile_size!r}")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise BundleInputError(f"--wsi_margin must be a whole number >= 0 (working pixels), got {margin!r}")
        if model_mpp is None:
            self.target_mpp = model_mpp_from_scale(image_scale)
        else:
            self.target_mpp = _positive(model_mpp, "--model_mpp")
        if backend not in BACKENDS:
            raise BundleInputError(f"--wsi_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.slides_source = slides
        self.network = network
        self.tta = check_tta(tta)
        # what the inferer calls on each batch of windows: the network, or the mean of its flipped views
        self.predictor = FlipAveraging(network, self.tta)
        self.inferer = inferer
        self.mean = torch.as_tensor(intensity_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(intensity_std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.output_dir = Path(output_dir)
        self.tile_size, self.margin = tile_size, margin
        # µm² of the training images' pixels -> working pixels
        area = int(min_object_area) * GLAS_MPP**2 / self.target_mpp**2
        self.min_area_px = int(round(area))
        self.cleanup = MaskCleanup(self.min_area_px, bool(fill_holes))
        self.num_classes = int(num_classes)
        self.mpp = mpp
        self.backend = backend
        self.weights = weights
        self.device = torch.device(device)
        self.amp = amp
        self.overwrite = overwrite
        self.save_probabilities = save_probabilities
        self.progress = progress
        self.mask_tile = mask_tile
        self.resume = as_switch(resume)
        if not isinstance(self.resume, bool):
            raise BundleInputError(f"--resume must be True or False, got {resume!r}")
        self.skip_glass = as_switch(skip_glass)
        if not isinstance(self.skip_glass, bool):
            raise BundleInputError(f"--wsi_skip_glass must be True or False, got {skip_glass!r}")
        self.glass_inferer = coordinate_inferer(inferer) if self.skip_glass else None
        self.window_roi = getattr(self.glass_inferer, "roi_size", None)
        if self.skip_glass and self.glass_inferer is None:
            logger.warning("--wsi_skip_glass: the inferer is not a plain SlidingWindowInferer; every window is run")

    # ------------------------------------------------------------------ outputs
    def output_paths(self, slide_path: Path) -> dict[str, Path]:
        stem = slide_path.stem
        paths = {"mask": self.output_dir / f"{stem}_mask.tif", "geojson": self.output_dir / f"{stem}.geojson"}
        if self.save_probabilities:
            paths["prob"] = self.output_dir / f"{stem}_prob.tif"
        return paths

    def work_dir(self, slide_path: Path) -> Path:
        """The hidden folder holding a slide's finished tiles while it runs (what ``resume`` continues from)."""
        return self.output_dir / f".{Path(slide_path).stem}.partial"

    def is_done(self, slide_path: Path) -> bool:
        """All of a slide's outputs exist and no unfinished work is left: a resumed run skips it."""
        paths = self.output_paths(slide_path).values()
        return all(os.path.lexists(p) for p in paths) and not self.work_dir(slide_path).exists()

    def check_outputs(self, slides: Sequence[Path]) -> None:
        """Refuse to start when an output exists already, unless ``overwrite`` (message as ``check_output_files``).

        With ``resume``, the outputs of a slide that has a work folder are a finish cut short and are replaced.
        """
        if self.resume:
            slides = [s for s in slides if not self.work_dir(s).exists()]
        existing = [p for s in slides for p in self.output_paths(s).values() if os.path.lexists(p)]
        if existing and not self.overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise BundleInputError(
                f"{existing[0]}{more} exists already; this run would replace it: choose another --output_dir or pass "
                "--overwrite True"
            )

    # ------------------------------------------------------------------ running
    def run(self) -> list[dict[str, Any]]:
        """Segment every slide; returns one summary per slide (paths, level, scale, tiles, seconds).

        All slides are opened first, so a slide without resolution or a damaged file stops the run before any work.
        """
        slides = list_slides(self.slides_source, exclude=self.output_dir)
        if self.resume:
            done = [s for s in slides if self.is_done(s)]
            for path in done:
                print(f"{path.name}: done already (resume), skipped", flush=True)
            slides = [s for s in slides if s not in done]
        self.check_outputs(slides)
        for path in slides:
            with Slide(path, backend=self.backend, mpp=self.mpp) as slide:
                choice = slide.choose_level(self.target_mpp)
                self._check_work(path, self.manifest(path, slide, WorkingGrid(slide, choice.level, choice.scale)))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.weights is not None:
            self.weights.load()
        self.network.eval()
        return [self.segment(path) for path in slides]

    def tile_selection(self, grid: WorkingGrid, tissue) -> tuple[list[tuple[int, int]], TileSelection]:
        """Working-grid origins ``(top, left)`` of the tiles whose core touches tissue, and their level-0 boxes."""
        origins, boxes, skipped = [], [], 0
        height, width = grid.shape
        for top in range(0, height, self.tile_size):
            for left in range(0, width, self.tile_size):
                y0, y1 = grid.level0_range(top, min(top + self.tile_size, height), 0)
                x0, x1 = grid.level0_range(left, min(left + self.tile_size, width), 1)
                if y1 > y0 and x1 > x0 and tissue.has_tissue(y0, x0, y1 - y0, x1 - x0):
                    origins.append((top, left))
                    boxes.append((y0, x0, y1 - y0, x1 - x0))
                else:
                    skipped += 1
        return origins, TileSelection(boxes, skipped)

    def segment(self, path: str | os.PathLike) -> dict[str, Any]:
        """Segment one slide and write its outputs; on failure nothing is left under an output's final name."""
        started = time.perf_counter()
        path = Path(path)
        outputs = self.output_paths(path)
        with Slide(path, backend=self.backend, mpp=self.mpp) as slide:
            choice = slide.choose_level(self.target_mpp)
            grid = WorkingGrid(slide, choice.level, choice.scale)
            tissue = detect_tissue(slide)
            origins, selection = self.tile_selection(grid, tissue)
            if tissue.notice:
                print(tissue.notice, flush=True)
            print(
                f"{path.name}: tissue {100 * tissue.fraction:.1f} % of the slide; {len(selection.boxes)} of "
                f"{selection.total} tiles segmented ({selection.skipped} skipped)",
                flush=True,
            )
            mpp_xy = (slide.mpp[1], slide.mpp[0])
            collector = PolygonCollector(scale=(grid.step[1], grid.step[0]), mpp=mpp_xy, min_area_px=self.min_area_px)
            work, stored = self._open_work(path, self.manifest(path, slide, grid))
            if stored:
                print(f"{path.name}: resuming, {len(stored)} of {len(origins)} tiles done already", flush=True)
            writers: list[PyramidWriter] = []
            finished: list[Path] = []
            try:
                mask_writer = PyramidWriter.for_mask(
                    outputs["mask"], grid.level0_shape, num_classes=self.num_classes, mpp=mpp_xy, tile=self.mask_tile
                )
                writers.append(mask_writer)
                prob_writer = None
                if self.save_probabilities:
                    prob_writer = PyramidWriter.for_probabilities(
                        outputs["prob"], grid.level0_shape, mpp=mpp_xy, tile=self.mask_tile
                    )
                    writers.append(prob_writer)
                bar = tqdm(origins, desc=path.name, unit="tile", disable=not self.progress)
                windows = [0, 0]  # computed, skipped as glass
                for top, left in bar:
                    tile = self._load_tile(work, top, left) if (top, left) in stored else None
                    if tile is None:
                        tile = self._segment_tile(slide, grid, top, left, tissue, windows)
                        self._save_tile(work, top, left, *tile)
                    self._emit(grid, top, left, *tile, collector, mask_writer, prob_writer)
                bar.close()
                if windows[1]:
                    share = 100 * windows[1] / sum(windows)
                    print(
                        f"{path.name}: {windows[1]} of {sum(windows)} windows in the tissue tiles were glass and "
                        f"skipped ({share:.0f} %)",
                        flush=True,
                    )
                for writer in writers:
                    writer.close()
                    finished.append(Path(writer.path))
                collector.write(outputs["geojson"])
                finished.append(outputs["geojson"])
                shutil.rmtree(work, ignore_errors=True)
            except BaseException:
                for writer in writers:
                    writer.abort()
                for done in finished:  # a set of outputs is complete or absent
                    done.unlink(missing_ok=True)
                raise
        seconds = time.perf_counter() - started
        logger.info("segmented %s in %.1f s -> %s", path, seconds, outputs["mask"])
        return {
            "slide": str(path),
            "level": choice.level,
            "scale": choice.scale,
            "working_shape": grid.shape,
            "tissue_fraction": tissue.fraction,
            "selection": selection,
            "windows": {"computed": windows[0], "skipped": windows[1]},
            "seconds": seconds,
            **{name: str(p) for name, p in outputs.items()},
        }

    def _predict(self, window: np.ndarray, predictor: GlassWindowPredictor | None = None) -> torch.Tensor:
        """Softmax probabilities ``[C, h, w]`` (float32, CPU) of a working window ``(h, w, 3)`` in 0..255."""
        batch = torch.from_numpy(window).permute(2, 0, 1)[None] / 255.0
        batch = ((batch - self.mean) / self.std).to(self.device)
        autocast = self.amp and self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, enabled=autocast):
            if predictor is None:
                logits = self.inferer(batch, self.predictor)
            else:
                logits = self.glass_inferer(batch, predictor)
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()

    def _glass_predictor(self, grid, tissue, top: int, left: int, shape) -> GlassWindowPredictor | None:
        """The predictor that skips the glass windows of the tile window at working ``(top, left)``."""
        if self.glass_inferer is None or tissue is None:
            return None
        # two tissue-mask pixels of slack: the low-resolution mask may miss a section's faint edge
        margin = int(math.ceil(2 * max(tissue.downsample)))

        def touches_tissue(y0: int, x0: int, y1: int, x1: int) -> bool:
            r0, r1 = grid.level0_range(top + y0, top + y1, 0)
            c0, c1 = grid.level0_range(left + x0, left + x1, 1)
            return r1 > r0 and c1 > c0 and tissue.has_tissue(r0, c0, r1 - r0, c1 - c0, margin)

        return GlassWindowPredictor(self.predictor, touches_tissue, shape, self.window_roi, self.num_classes)

    def _segment_tile(self, slide, grid, top, left, tissue=None, windows=None) -> tuple[np.ndarray, np.ndarray | None]:
        """The core's classes (uint8, after the clean-up on the whole window) and, when saved, its foreground
        probability as the probability TIFF's 8-bit values; ``windows`` counts computed and skipped windows."""
        height, width = grid.shape
        core_h, core_w = min(self.tile_size, height - top), min(self.tile_size, width - left)
        m = self.margin
        window = grid.read(slide, top - m, left - m, core_h + 2 * m, core_w + 2 * m)
        predictor = self._glass_predictor(grid, tissue, top - m, left - m, window.shape[:2])
        probs = self._predict(window, predictor)
        if predictor is not None and windows is not None:
            windows[0] += predictor.computed
            windows[1] += predictor.skipped
        classes = first_argmax(probs).numpy()
        classes = np.asarray(self.cleanup(classes), dtype=np.uint8)[m : m + core_h, m : m + core_w]
        foreground = None
        if self.save_probabilities:
            foreground = to_output_dtype((1.0 - probs[0]).numpy()[m : m + core_h, m : m + core_w], np.uint8, 255)
        return np.ascontiguousarray(classes), foreground

    def _emit(self, grid, top, left, classes, foreground, collector, mask_writer, prob_writer) -> None:
        """Hand one tile's core to the collector and the writers (a computed tile or one stored by a killed run)."""
        core_h, core_w = classes.shape
        collector.add_mask(classes, origin=(left, top))
        # the core at level 0: the working pixel under each level-0 pixel centre
        y0, y1 = grid.level0_range(top, top + core_h, 0)
        x0, x1 = grid.level0_range(left, left + core_w, 1)
        if y1 <= y0 or x1 <= x0:
            return
        rows = grid.working_index(y0, y1, 0) - top
        cols = grid.working_index(x0, x1, 1) - left
        mask_writer.write(classes[np.ix_(rows, cols)], y0, x0)
        if prob_writer is not None:
            prob_writer.write(foreground[np.ix_(rows, cols)] / 255.0, y0, x0)  # written back as the same 8 bits

    # ------------------------------------------------------------------ resuming
    def manifest(self, path: Path, slide: Slide, grid: WorkingGrid) -> dict[str, Any]:
        """What decides a slide's result; a killed run is resumed only when this is unchanged."""
        stat = Path(path).stat()
        checkpoint = None
        if getattr(self.weights, "load_path", None) is not None:
            ckpt = Path(self.weights.load_path)
            ckpt_stat = ckpt.stat() if ckpt.is_file() else None
            checkpoint = {
                "path": str(ckpt.resolve()),
                "size": ckpt_stat.st_size if ckpt_stat else None,
                "mtime_ns": ckpt_stat.st_mtime_ns if ckpt_stat else None,
            }
        inferer = {
            name: _plain(getattr(self.inferer, name))
            for name in ("roi_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval")
            if hasattr(self.inferer, name)
        }
        return {
            "slide": {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "slide_mpp": [float(v) for v in slide.mpp],
            "level": grid.level,
            "scale": grid.scale,
            "working_shape": list(grid.shape),
            "tile_size": self.tile_size,
            "margin": self.margin,
            "skip_glass": self.glass_inferer is not None,
            "min_area_px": self.min_area_px,
            "fill_holes": self.cleanup.fill_holes,
            "num_classes": self.num_classes,
            "save_probabilities": bool(self.save_probabilities),
            "intensity_mean": self.mean.flatten().tolist(),
            "intensity_std": self.std.flatten().tolist(),
            "inferer": inferer,
            "tta": self.tta,
            "checkpoint": checkpoint,
        }

    def _check_work(self, path: Path, manifest: dict[str, Any]) -> bool:
        """Whether a killed run's tiles of ``path`` are to be used; raises where the user must choose."""
        work = self.work_dir(path)
        if not work.exists():
            return False
        if not self.resume:
            if self.overwrite:
                return False
            raise BundleInputError(
                f"{work} holds a partly segmented {Path(path).name} from a killed run: pass --resume true to continue "
                "it, or --overwrite True to start the slide again"
            )
        try:
            old = json.loads((work / "manifest.json").read_text())
        except (OSError, ValueError):
            old = None
        difference = _difference(old, manifest) if isinstance(old, dict) else "its manifest.json is missing or damaged"
        if difference is None:
            return True
        if self.overwrite:
            return False
        raise BundleInputError(
            f"cannot resume {Path(path).name}: {difference}; pass --overwrite True to start the slide again"
        )

    def _open_work(self, path: Path, manifest: dict[str, Any]) -> tuple[Path, set[tuple[int, int]]]:
        """The slide's work folder, ready: the stored tiles ``(top, left)`` to reuse, or a fresh folder."""
        work = self.work_dir(path)
        if self._check_work(path, manifest):
            stored = set()
            for item in work.glob("tile_*_*.npz"):
                parts = item.stem.split("_")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    stored.add((int(parts[1]), int(parts[2])))
            return work, stored
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _atomic_write(work / "manifest.json", json.dumps(manifest, indent=1).encode())
        return work, set()

    def _save_tile(self, work: Path, top: int, left: int, classes: np.ndarray, foreground: np.ndarray | None) -> None:
        """Store a finished tile; the rename makes it count only once complete."""
        arrays = {"classes": classes} if foreground is None else {"classes": classes, "foreground": foreground}
        final = work / f"tile_{top}_{left}.npz"
        temp = temporary_name(str(final))
        try:
            with open(temp, "wb") as handle:
                np.savez_compressed(handle, **arrays)
            os.replace(temp, final)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def _load_tile(self, work: Path, top: int, left: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A stored tile, or None (computed again) when its file cannot be read."""
        try:
            with np.load(work / f"tile_{top}_{left}.npz") as data:
                classes = data["classes"]
                foreground = data["foreground"] if self.save_probabilities else None
        except (OSError, ValueError, KeyError, EOFError) as error:
            logger.warning("tile (%d, %d) of %s is unreadable (%s); computing it again", top, left, work, error)
            return None
        return classes, foreground


def _plain(value: Any) -> Any:
    """A JSON-comparable form of an inferer setting."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first setting that differs between two manifests, in words (None when they agree)."""
    for key in new:
        if old.get(key) != json.loads(json.dumps(new[key])):
            return f"{key} was {json.dumps(old.get(key))} in the killed run, now {json.dumps(new[key])}"
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    temp = temporary_name(str(path))
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def model_mpp_from_scale(image_scale: float) -> float:
    """µm per pixel of a model with this ``image_scale`` (an input error for a bad scale)."""
    return model_mpp(_positive(image_scale, "--image_scale", ""))


def _positive(value: Any, option: str, unit: str = " (µm per pixel)") -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise BundleInputError(f"{option} must be a number > 0{unit}, got {value!r}")
    return number
