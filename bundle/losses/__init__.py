"""Losses of MPAMatch: supervised, UniMatch consistency, pixel-to-prototype contrast and the image prototype bank."""

from .contrast import flatten_pixels, prototype_contrast_loss, sample_balanced_pixels
from .mpamatch import MPAMatchLoss, StepOutputs
from .prototype_bank import ImagePrototypeBank
from .segmentation import ConsistencyLoss, SupervisedLoss, squeeze_target

__all__ = [
    "ConsistencyLoss",
    "ImagePrototypeBank",
    "MPAMatchLoss",
    "StepOutputs",
    "SupervisedLoss",
    "flatten_pixels",
    "prototype_contrast_loss",
    "sample_balanced_pixels",
    "squeeze_target",
]
