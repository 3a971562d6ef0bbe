"""Segmenting images too large to load whole: blocks with a context margin, sliding windows inside each block.

Whole-image inference holds the image and its prediction as float tensors several times over (the loaded image,
the scaled and normalised copies, the blended logits and their weights, the probabilities): about 1 GB for a
4000 x 3000 RGB image and far more for a slide. :class:`LargeImageSegmenter` instead walks the image in blocks of
``block_size`` pixels (one horizontal band of blocks at a time). Each block is read with a margin of context
(``margin``, default half the window) through :func:`~bundle.inference.regions.open_region_reader` (a TIFF decodes
only the tiles it needs), goes through the config's ``preprocessing`` (without its ``LoadImaged``) and the config's
``inferer`` (sliding windows with Gaussian blending), and only the block's own pixels are kept: softmax, argmax, and
the band is written to a tiled TIFF as it is finished (:class:`~bundle.inference.writers.TiledTiffWriter`). A PNG
mask (non-TIFF input without ``output_ext``) is assembled in memory as uint8 (H x W bytes) and saved at the end.

MONAI's ``PatchInferer`` + ``WSISlidingWindowSplitter`` were considered: with the tifffile backend MONAI's
``TiffFileWSIReader`` decodes the whole level for every patch, ``AvgMerger`` keeps the full float output in memory
and blends uniformly (no Gaussian weights), and openslide/cuCIM are extra native dependencies.

Output names and values match the whole-image path (``SaveSegmentationd`` with the same options); a network that
works pixel by pixel gives the identical mask on both paths.

An image that cannot be read (its header, a tile found corrupt halfway) raises
:class:`~bundle.inference.skipping.UnreadableImage`; its partial outputs are removed (they were written under
temporary names), and with ``--on_error skip`` the next image follows.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged
from tqdm import tqdm

from ..errors import BundleInputError
from .checkpoint import CheckpointWeightsLoader
from .cleanup import MaskCleanup
from .regions import RegionReader, open_region_reader
from .skipping import SkippedImages, UnreadableImage, skipping
from .writers import OutputFolderLayout, TiledTiffWriter, to_output_dtype, write_map

__all__ = ["LargeImageSegmenter", "first_argmax"]

logger = logging.getLogger(__name__)


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """``argmax`` over dim 0 of [C, H, W] (first index on ties), as C vectorised comparisons: torch's reduction
    over the leading, strided dimension is several times slower on CPU."""
    best, index = values[0].clone(), torch.zeros(values.shape[1:], dtype=torch.uint8)
    for channel in range(1, values.shape[0]):
        better = values[channel] > best
        index[better] = channel
        best = torch.maximum(best, values[channel])
    return index


@contextmanager
def _reading() -> Iterator[None]:
    """Reading the input: its errors become :class:`UnreadableImage` (same message), which ``--on_error skip`` skips;
    errors of the outputs keep their type and stop the run."""
    try:
        yield
    except UnreadableImage:
        raise
    except BundleInputError as err:
        raise UnreadableImage(str(err)) from err


class _MapSink:
    """Where the bands of one output map go: a tiled TIFF written as it comes, or a uint8 array saved at the end."""

    def __init__(self, path: str, height: int, width: int, dtype: np.dtype, channels: int, tile: int) -> None:
        self.path = path
        self.tiff = path.lower().endswith((".tif", ".tiff"))
        if self.tiff:
            self.writer: TiledTiffWriter | None = TiledTiffWriter(path, height, width, dtype, channels, tile)
            self.array: np.ndarray | None = None
        else:
            self.writer = None
            shape = (height, width) if channels == 1 else (height, width, channels)
            self.array = np.zeros(shape, dtype)
            self.rows = 0

    def write_band(self, band: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.write_band(band)
        else:
            self.array[self.rows : self.rows + band.shape[0]] = band
            self.rows += band.shape[0]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            write_map(self.path, self.array)
            self.array = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self.array = None


class LargeImageSegmenter:
    """Segment ``items`` block by block and write ``<stem>_mask`` (and ``<stem>_prob.tif``) like the evaluator does.

    Args:
        items: ``[{"image": path}, ...]``, usually the large ones of ``inference_inputs`` (see ``filter_by_size``).
        network: the network (weights are loaded through ``weights`` first when given).
        preprocessing: the config's preprocessing ``Compose``; its ``LoadImaged`` is skipped and every other
            transform is applied to each block given as an (H, W, 3) image with ``original_channel_dim=-1``.
        inferer: the config's inferer (a ``SlidingWindowInferer``), called as ``inferer(block, network)``.
        output_dir, output_ext, data_root_dir: as for :class:`~bundle.inference.writers.SaveSegmentationd`.
        mask_scale: the mask value of class k is ``k * mask_scale`` (uint8).
        cleanup: a :class:`~bundle.inference.cleanup.MaskCleanup`, applied to each block's class map with its
            margin, before the margin is cut off: an object crossing a block edge is judged on the part of it the
            window holds (at least ``margin`` pixels beyond the edge), a hole on what the window encloses.
        save_probabilities, probability_dtype, probability_channels: write ``<stem>_prob.tif`` with these
            softmax channels (``None``: all) as float32/float16.
        weights: a :class:`~bundle.inference.checkpoint.CheckpointWeightsLoader` whose ``load()`` runs first.
        device: where blocks are sent; ``amp``: autocast on CUDA.
        block_size: block side in pixels (a multiple of ``tile_size``); ``margin``: context read around each block
            (None: half the inferer's window); ``tile_size``: TIFF tile side.
        progress: a tqdm bar over the blocks of each image.
        errors: with ``on_error`` ``skip``, an image that cannot be read is recorded there and the next one follows.
    """

    def __init__(
        self,
        items: Sequence[dict[str, Any]],
        network: torch.nn.Module,
        preprocessing: Compose | Sequence[Callable],
        inferer: Callable,
        output_dir: str | os.PathLike,
        output_ext: str | None = None,
        data_root_dir: str | os.PathLike = "",
        mask_scale: float = 1,
        cleanup: MaskCleanup | None = None,
        save_probabilities: bool = False,
        probability_dtype: str = "float32",
        probability_channels: Sequence[int] | None = None,
        weights: CheckpointWeightsLoader | None = None,
        device: str | torch.device = "cpu",
        amp: bool = False,
        block_size: int = 1024,
        margin: int | None = None,
        tile_size: int = 256,
        progress: bool = True,
        errors: SkippedImages | None = None,
    ) -> None:
        if tile_size < 16 or tile_size % 16:
            raise BundleInputError(f"large_image_tile must be a positive multiple of 16, got {tile_size}")
        if block_size < tile_size or block_size % tile_size:
            raise BundleInputError(
                f"large_image_block must be a positive multiple of the tile size {tile_size}, got {block_size}"
            )
        roi = getattr(inferer, "roi_size", None)
        self.margin = int(margin) if margin is not None else (max(roi) // 2 if roi else 64)
        if self.margin < 0:
            raise BundleInputError(f"large_image_margin must be >= 0, got {margin}")
        self.items = list(items)
        self.network = network
        transforms = preprocessing.transforms if isinstance(preprocessing, Compose) else preprocessing
        self.block_transform = Compose([t for t in transforms if not isinstance(t, LoadImaged)])
        self.inferer = inferer
        self.mask_layout = OutputFolderLayout(output_dir, "mask", output_ext, data_root_dir)
        self.prob_layout = OutputFolderLayout(output_dir, "prob", ".tif", data_root_dir)
        self.mask_scale = mask_scale
        self.cleanup = cleanup
        self.save_probabilities = save_probabilities
        self.probability_dtype = np.dtype(probability_dtype)
        self.probability_channels = None if probability_channels is None else list(probability_channels)
        self.weights = weights
        self.device = torch.device(device)
        self.amp = amp
        self.block_size = block_size
        self.tile_size = tile_size
        self.progress = progress
        self.errors = errors

    def run(self) -> list[str]:
        """Segment every item; returns the written mask paths (unreadable images are skipped with ``skip``)."""
        if not self.items:
            return []
        if self.weights is not None:
            self.weights.load()
        self.network.eval()
        written = []
        for item in self.items:
            try:
                written.append(self.segment(item["image"]))
            except UnreadableImage as err:
                if not skipping(self.errors):
                    raise
                self.errors.add(item["image"], err)
        return written

    def _predict_block(self, window: np.ndarray, path: str) -> torch.Tensor:
        """Softmax probabilities [C, h, w] (float32, CPU) of one window given as (h, w, 3) uint8."""
        image = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)),
            meta={"original_channel_dim": -1, "spatial_shape": window.shape[:2], "filename_or_obj": path},
        )
        data = self.block_transform({"image": image})
        block = data["image"]
        batch = (block.as_tensor() if isinstance(block, MetaTensor) else torch.as_tensor(block))[None]
        batch = batch.to(self.device)
        autocast = self.amp and self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, enabled=autocast):
            logits = self.inferer(batch, self.network)
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()

    def segment(self, path: str) -> str:
        """Segment one image; returns the mask path."""
        started = time.perf_counter()
        with _reading():
            reader: RegionReader = open_region_reader(path)
        sinks: list[_MapSink] = []
        try:
            height, width = reader.height, reader.width
            mask_path = self.mask_layout.filename(subject=path)
            mask_sink = _MapSink(mask_path, height, width, np.dtype(np.uint8), 1, self.tile_size)
            sinks.append(mask_sink)
            prob_sink = None
            rows = math.ceil(height / self.block_size)
            cols = math.ceil(width / self.block_size)
            bar = tqdm(total=rows * cols, desc=os.path.basename(path), unit="block", disable=not self.progress)
            with bar:
                for top in range(0, height, self.block_size):
                    band_height = min(self.block_size, height - top)
                    mask_band = np.zeros((band_height, width), np.uint8)
                    prob_band = None
                    for left in range(0, width, self.block_size):
                        block_width = min(self.block_size, width - left)
                        y0, x0 = max(0, top - self.margin), max(0, left - self.margin)
                        y1 = min(height, top + band_height + self.margin)
                        x1 = min(width, left + block_width + self.margin)
                        with _reading():
                            window = reader.read(y0, x0, y1 - y0, x1 - x0)
                        probs = self._predict_block(window, path)
                        core = (slice(top - y0, top - y0 + band_height), slice(left - x0, left - x0 + block_width))
                        if self.cleanup is not None and self.cleanup.enabled:  # judged with the margin's context
                            classes = self.cleanup(first_argmax(probs).numpy())[core]
                        else:
                            classes = first_argmax(probs[(slice(None),) + core]).numpy()
                        probs = probs[(slice(None),) + core]
                        mask_band[:, left : left + block_width] = to_output_dtype(classes, np.uint8, self.mask_scale)
                        if self.save_probabilities:
                            selected = probs if self.probability_channels is None else probs[self.probability_channels]
                            if prob_band is None:
                                prob_band = np.zeros((band_height, width, selected.shape[0]), self.probability_dtype)
                            prob_band[:, left : left + block_width] = selected.permute(1, 2, 0).numpy()
                        bar.update(1)
                    mask_sink.write_band(mask_band)
                    if prob_band is not None:
                        if prob_sink is None:
                            channels = prob_band.shape[-1]
                            prob_sink = _MapSink(
                                self.prob_layout.filename(subject=path),
                                height,
                                width,
                                self.probability_dtype,
                                channels,
                                self.tile_size,
                            )
                            sinks.append(prob_sink)
                        prob_sink.write_band(prob_band[..., 0] if prob_band.shape[-1] == 1 else prob_band)
            for sink in sinks:
                sink.close()
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        finally:
            reader.close()
        logger.info(
            "segmented %s (%dx%d) in %.1f s -> %s", path, height, width, time.perf_counter() - started, mask_path
        )
        return mask_path
