"""Test-time augmentation: each window is predicted in several flipped (or transposed) views, averaged back.

Why: H&E tiles have no preferred orientation, and a network trained from few labels is not exactly equivariant to
flips, so averaging the views' probabilities removes part of its variance (fragmented and merged glands at the
boundaries) at the price of one network pass per view. ``tta`` is ``"none"`` (one pass), ``"flips"`` (4: the
identity, horizontal, vertical and both flips, which include the 180 degree rotation) or ``"dihedral"`` (8: the
four flips of the image and of its transpose, i.e. every 90 degree rotation and mirror).

The averaging happens per sliding window inside the config's inferer (:class:`FlipInferer` hands the inferer a
:class:`FlipAveraging` predictor), so validation, evaluation, inference, large images, whole slides (with glass
windows skipped) and MONAI Label share it. The predictor returns ``log(mean softmax)``: a softmax of it is exactly
the mean probability of the views, and an argmax of it is their consensus, so everything after the inferer
(softmax, argmax, the clean-up) is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from ..errors import BundleInputError

__all__ = ["TTA_MODES", "FlipAveraging", "FlipInferer", "check_tta"]

# views per mode: (transpose the two spatial axes first, flipped spatial dims)
_FLIPS = ((), (-1,), (-2,), (-2, -1))
TTA_MODES: dict[str, tuple[tuple[bool, tuple[int, ...]], ...]] = {
    "none": ((False, ()),),
    "flips": tuple((False, dims) for dims in _FLIPS),
    "dihedral": tuple((False, dims) for dims in _FLIPS) + tuple((True, dims) for dims in _FLIPS),
}


def check_tta(mode: Any) -> str:
    """``mode`` if it is one of :data:`TTA_MODES`; anything else is an input error naming ``tta``."""
    if not isinstance(mode, str) or mode not in TTA_MODES:
        raise BundleInputError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    return mode


class FlipAveraging:
    """A predictor: ``network`` on every view of a batch of windows, ``log`` of the mean softmax at the input's
    orientation (float32, also under AMP). With ``"none"`` it is ``network`` itself."""

    def __init__(self, network: Callable, mode: str = "flips") -> None:
        self.network = network
        self.views = TTA_MODES[check_tta(mode)]

    def __call__(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(self.views) == 1:
            return self.network(inputs, *args, **kwargs)
        total = None
        for transpose, dims in self.views:
            view = inputs.transpose(-2, -1) if transpose else inputs
            view = torch.flip(view, dims) if dims else view
            logits = self.network(view, *args, **kwargs)
            logits = torch.flip(logits, dims) if dims else logits
            logits = logits.transpose(-2, -1) if transpose else logits
            log_probs = torch.log_softmax(torch.as_tensor(logits).float(), dim=1)
            total = log_probs if total is None else torch.logaddexp(total, log_probs)
        return total - math.log(len(self.views))


class FlipInferer(Inferer):
    """Runs ``inferer`` with the network wrapped in :class:`FlipAveraging` (``tta`` views per window)."""

    def __init__(self, inferer: Callable, tta: str = "none") -> None:
        super().__init__()
        self.inferer = inferer
        self.tta = check_tta(tta)

    @property
    def roi_size(self) -> tuple[int, ...] | None:
        """The inner inferer's window (the context a large-image block needs)."""
        return getattr(self.inferer, "roi_size", None)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        predictor = network if self.tta == "none" else FlipAveraging(network, self.tta)
        return self.inferer(inputs, predictor, *args, **kwargs)
