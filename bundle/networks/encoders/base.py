"""What every TransUNet encoder returns and exposes: a 1/16 feature map plus skips at 1/8, 1/4 and 1/2."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["EncoderOutput", "TransUNetEncoder"]


class EncoderOutput(NamedTuple):
    """Encoder result: ``features`` [B, out_channels, H/16, W/16]; ``skips`` at 1/8, 1/4, 1/2 (in that order)."""

    features: torch.Tensor
    skips: list[torch.Tensor]


class TransUNetEncoder(nn.Module):
    """Base of the encoders: subclasses set the attributes below and implement ``forward(image) -> EncoderOutput``.

    ``backbone`` is the part that ``freeze_encoder`` freezes and ``encoder_lr_scale`` scales: the whole encoder for
    the hybrid preset, the (possibly pretrained) ViT for the timm/UNI presets, whose skip adapters are new layers and
    always train at the decoder's rate.
    """

    out_channels: int
    skip_channels: tuple[int, int, int]
    patch_size: int = 16

    @property
    def backbone(self) -> nn.Module:
        return self
