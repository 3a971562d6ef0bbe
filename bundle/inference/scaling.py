"""The magnification a model works at: ``image_scale`` resizes the input for the network, never the result.

Training resizes images and masks once when they are loaded (MONAI's ``Zoomd`` in ``configs/train.json``); every
prediction (validation, evaluation, inference, large images, MONAI Label) goes through :class:`ScaledInferer`, which
resizes the image to the working scale, runs the config's sliding-window inferer there and resizes the logits back
to the image's own size. Masks and every metric are therefore always at the image's original resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

from ..errors import BundleInputError

__all__ = ["ScaledInferer", "check_image_scale"]


def check_image_scale(scale: float) -> float:
    """``scale`` as a float in (0, 4]; anything else is an input error naming ``image_scale``."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise BundleInputError(f"image_scale must be a number in (0, 4], got {scale!r}") from None
    if not 0.0 < value <= 4.0:
        raise BundleInputError(f"image_scale must be a number in (0, 4], got {scale!r}")
    return value


class ScaledInferer(Inferer):
    """Runs ``inferer`` on the input resized by ``scale`` and returns logits at the input's size.

    Downscaling averages pixels (``area``, no aliasing of nuclei and thin gland borders); upscaling, and the logits'
    return to the input size, are bilinear. ``scale=1`` calls ``inferer`` unchanged.
    """

    def __init__(self, inferer: Callable, scale: float = 1.0) -> None:
        super().__init__()
        self.inferer = inferer
        self.scale = check_image_scale(scale)

    @property
    def roi_size(self) -> tuple[int, ...] | None:
        """The inner inferer's window measured in input pixels (the context a large-image block needs)."""
        roi = getattr(self.inferer, "roi_size", None)
        return None if roi is None else tuple(int(round(r / self.scale)) for r in roi)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.scale == 1.0:
            return self.inferer(inputs, network, *args, **kwargs)
        size = tuple(inputs.shape[2:])
        scaled = tuple(max(1, int(round(s * self.scale))) for s in size)
        mode = "area" if self.scale < 1.0 else "bilinear"
        resized = F.interpolate(inputs, size=scaled, mode=mode, **({} if mode == "area" else {"align_corners": False}))
        logits = self.inferer(resized, network, *args, **kwargs)
        return F.interpolate(torch.as_tensor(logits), size=size, mode="bilinear", align_corners=False)
