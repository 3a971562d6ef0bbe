"""Skip the sliding windows of a tissue tile that hold only glass.

Why: a tile is segmented when any of it touches tissue, so a tile on a section's edge is mostly glass, and on a
slide with a few sections those edge tiles are a large share of the work (20000 px, two sections, 30 % tissue:
45 of 100 tiles of 1024 working pixels hold tissue, but only about a third of their windows do). The config's
sliding-window inferer runs with ``with_coord`` so that :class:`GlassWindowPredictor` sees where each window lies;
it runs the network on the windows whose area (grown by ``margin`` level-0 pixels) touches the tissue mask and gives
the others a certain background. A glass window covers glass pixels only, so every tissue pixel is predicted from
the same windows, with the same blending weights, as without skipping: only glass pixels that are also covered by a
tissue window blend in the background vote, which is what the skipped tiles get too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

__all__ = ["GLASS_LOGIT", "GlassWindowPredictor", "coordinate_inferer"]

# the background logit's lead on a glass window: softmax gives background 1 (to float32 precision) and, blended with
# a real window, it outweighs any logit a network gives; finite and within float16's range, so no inf/NaN under AMP
GLASS_LOGIT = 1.0e4


def coordinate_inferer(inferer: Any) -> SlidingWindowInferer | None:
    """A copy of ``inferer`` that passes window coordinates to the predictor, or None where windows cannot be
    skipped (not a plain :class:`SlidingWindowInferer`, or a buffered one whose slices are not boxes)."""
    if type(inferer) is not SlidingWindowInferer or getattr(inferer, "buffer_steps", None):
        return None
    clone = copy.copy(inferer)
    clone.with_coord = True
    return clone


class GlassWindowPredictor:
    """The predictor for one tile window: the network on tissue windows, a certain background on the others.

    Args:
        network: the segmentation network (called on a batch of windows).
        touches_tissue: ``touches_tissue(y0, x0, y1, x1)`` for a box in the tile window's working pixels.
        window_shape: ``(height, width)`` of the tile window handed to the inferer (before the inferer's padding).
        roi_size: the inferer's window size; a tile window smaller than it is padded evenly by MONAI.
        num_classes: the network's output channels (for a batch with no tissue window at all).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        touches_tissue,
        window_shape: Sequence[int],
        roi_size: Sequence[int],
        num_classes: int,
    ) -> None:
        self.network = network
        self.touches_tissue = touches_tissue
        # MONAI pads a dimension smaller than the window by (roi - size) // 2 before it
        self.pad = [max(int(r) - int(s), 0) // 2 for s, r in zip(window_shape, roi_size)]
        self.num_classes = int(num_classes)
        self.computed = 0
        self.skipped = 0

    def is_tissue(self, coord: Sequence[slice]) -> bool:
        """Whether a window (MONAI's ``[batch, channel, y, x]`` slices) touches tissue."""
        ys, xs = coord[-2], coord[-1]
        return self.touches_tissue(
            ys.start - self.pad[0], xs.start - self.pad[1], ys.stop - self.pad[0], xs.stop - self.pad[1]
        )

    def __call__(self, windows: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
        keep = [i for i, coord in enumerate(coords) if self.is_tissue(coord)]
        self.computed += len(keep)
        self.skipped += len(coords) - len(keep)
        if len(keep) == len(coords):
            return self.network(windows)
        computed = self.network(windows[keep]) if keep else None
        channels = computed.shape[1] if computed is not None else self.num_classes
        dtype = computed.dtype if computed is not None else windows.dtype
        out = windows.new_full((windows.shape[0], channels, *windows.shape[2:]), -GLASS_LOGIT, dtype=dtype)
        out[:, 0] = 0.0
        if computed is not None:
            out[keep] = computed
        return out
