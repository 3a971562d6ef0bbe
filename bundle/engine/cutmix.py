"""CutMix for the strong views of UniMatch-style training: random boxes, and mixing of images, pseudo-labels,
confidences and ignore masks with *the same* boxes. Pure torch; runs on batches on the training device.

Box sampling follows UniMatch's ``obtain_cutmix_box``: with probability ``prob`` a sample gets one box whose area is
a fraction ``U(area)`` of the image and whose aspect ratio (height / width) is ``U(aspect_ratio)``; ratio and corner
are redrawn until the box fits inside the image (rejection sampling, the area is drawn once).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import BundleInputError

__all__ = ["CutMix", "roll_source"]


def roll_source(x: torch.Tensor, shifts: int = 1) -> torch.Tensor:
    """The default CutMix source: the batch rolled along dim 0, so sample ``i`` takes its box from sample
    ``i - shifts`` (mod B). Returns a new tensor."""
    return torch.roll(x, shifts=shifts, dims=0)


class CutMix:
    """Sample CutMix boxes and paste boxed pixels from a source batch into a target batch.

    Args:
        prob: probability that a sample gets a box (otherwise its box mask is all False).
        area: (min, max) fraction of the image area covered by a box, within (0, 1].
        aspect_ratio: (min, max) of the box's height / width ratio.
        max_tries: rejection-sampling rounds before a box that still does not fit is clipped to the image (only
            reachable when the area cannot fit, e.g. very elongated images).
    """

    def __init__(
        self,
        prob: float = 0.5,
        area: tuple[float, float] = (0.02, 0.4),
        aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        max_tries: int = 1000,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise BundleInputError(f"CutMix prob must be in [0, 1], got {prob}")
        area_min, area_max = (float(v) for v in area)
        if not 0.0 < area_min <= area_max <= 1.0:
            raise BundleInputError(f"CutMix area must satisfy 0 < min <= max <= 1, got {tuple(area)}")
        ratio_min, ratio_max = (float(v) for v in aspect_ratio)
        if not 0.0 < ratio_min <= ratio_max:
            raise BundleInputError(f"CutMix aspect_ratio must satisfy 0 < min <= max, got {tuple(aspect_ratio)}")
        if max_tries < 1:
            raise BundleInputError(f"CutMix max_tries must be >= 1, got {max_tries}")
        self.prob = float(prob)
        self.area = (area_min, area_max)
        self.aspect_ratio = (ratio_min, ratio_max)
        self.max_tries = int(max_tries)

    def sample_boxes(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Boolean box masks ``[B, H, W]`` (True inside the box). Random numbers come from ``generator`` when given
        (on its own device), else from torch's global generator."""
        draw_device = generator.device if generator is not None else torch.device("cpu")

        def uniform(n: int, low: float, high: float) -> torch.Tensor:
            u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64)
            return low + (high - low) * u

        active = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64) < self.prob
        box_area = uniform(batch_size, *self.area) * height * width
        box_h = torch.zeros(batch_size, dtype=torch.int64, device=draw_device)
        box_w = torch.zeros_like(box_h)
        top = torch.zeros_like(box_h)
        left = torch.zeros_like(box_h)
        pending = active.clone()
        for _ in range(self.max_tries):
            if not bool(pending.any()):
                break
            ratio = uniform(batch_size, *self.aspect_ratio)
            # UniMatch: cutmix_w = int(sqrt(size / ratio)), cutmix_h = int(sqrt(size * ratio)), corner uniform
            cand_w = torch.sqrt(box_area / ratio).floor().to(torch.int64)
            cand_h = torch.sqrt(box_area * ratio).floor().to(torch.int64)
            cand_left = (uniform(batch_size, 0.0, 1.0) * width).floor().to(torch.int64).clamp_(max=width - 1)
            cand_top = (uniform(batch_size, 0.0, 1.0) * height).floor().to(torch.int64).clamp_(max=height - 1)
            fits = pending & (cand_left + cand_w <= width) & (cand_top + cand_h <= height)
            box_w = torch.where(fits, cand_w, box_w)
            box_h = torch.where(fits, cand_h, box_h)
            left = torch.where(fits, cand_left, left)
            top = torch.where(fits, cand_top, top)
            pending &= ~fits
        if bool(pending.any()):  # could not fit: clip the last candidate into the image
            clipped_w = cand_w.clamp(max=width)
            clipped_h = cand_h.clamp(max=height)
            box_w = torch.where(pending, clipped_w, box_w)
            box_h = torch.where(pending, clipped_h, box_h)
            left = torch.where(pending, torch.minimum(cand_left, width - clipped_w), left)
            top = torch.where(pending, torch.minimum(cand_top, height - clipped_h), top)
        out_device = torch.device(device) if device is not None else draw_device
        top, left, box_h, box_w, active = (t.to(out_device) for t in (top, left, box_h, box_w, active))
        rows = torch.arange(height, device=out_device).view(1, height, 1)
        cols = torch.arange(width, device=out_device).view(1, 1, width)
        inside_rows = (rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
        inside_cols = (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1))
        return inside_rows & inside_cols & active.view(-1, 1, 1)

    @staticmethod
    def mix(boxes: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """A new tensor equal to ``target`` outside ``boxes`` ``[B, H, W]`` and to ``source`` inside; works for
        ``[B, C, H, W]`` images and ``[B, H, W]`` / ``[B, 1, H, W]`` labels, confidences and masks."""
        if target.shape != source.shape:
            raise ValueError(f"CutMix target {tuple(target.shape)} and source {tuple(source.shape)} differ in shape")
        if boxes.ndim != 3 or target.ndim not in (3, 4) or target.shape[0] != boxes.shape[0]:
            raise ValueError(f"CutMix boxes {tuple(boxes.shape)} do not fit a batch of shape {tuple(target.shape)}")
        if target.shape[-2:] != boxes.shape[-2:]:
            raise ValueError(f"CutMix boxes {tuple(boxes.shape)} and tensor {tuple(target.shape)} differ in H, W")
        where = boxes.to(device=target.device, dtype=torch.bool)
        if target.ndim == 4:
            where = where.unsqueeze(1)
        return torch.where(where, source.to(target.dtype), target)

    def mix_all(
        self,
        boxes: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        sources: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mix every tensor of ``targets`` with the same ``boxes``; ``sources`` (same keys) defaults to each target
        rolled by one sample (:func:`roll_source`)."""
        if sources is None:
            sources = {key: roll_source(value) for key, value in targets.items()}
        elif set(sources) != set(targets):
            raise ValueError(f"CutMix sources {sorted(sources)} and targets {sorted(targets)} have different keys")
        return {key: self.mix(boxes, value, sources[key]) for key, value in targets.items()}

    def __call__(
        self,
        targets: Mapping[str, torch.Tensor],
        sources: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Sample boxes for the batch of ``targets`` (shape from its first tensor) and mix them all; returns
        ``(mixed, boxes)``."""
        if not targets:
            raise ValueError("CutMix needs at least one tensor to mix")
        first = next(iter(targets.values()))
        boxes = self.sample_boxes(first.shape[0], first.shape[-2], first.shape[-1], first.device, generator)
        return self.mix_all(boxes, targets, sources), boxes

    def __repr__(self) -> str:
        ratio = tuple(round(v, 4) for v in self.aspect_ratio)
        return f"CutMix(prob={self.prob}, area={self.area}, aspect_ratio={ratio})"
