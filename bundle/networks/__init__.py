"""Networks of the bundle: TransUNet (CUP decoder, projection head, FP stream) and its encoder presets."""

from __future__ import annotations

from .encoders import (
    ENCODER_PRESETS,
    EncoderOutput,
    HybridEncoder,
    TransUNetEncoder,
    ViTEncoder,
    build_encoder,
    build_timm_encoder,
    build_uni_encoder,
    load_vit_checkpoint,
)
from .transunet import CUPDecoder, ProjectionHead, TransUNet

__all__ = [
    "ENCODER_PRESETS",
    "CUPDecoder",
    "EncoderOutput",
    "HybridEncoder",
    "ProjectionHead",
    "TransUNet",
    "TransUNetEncoder",
    "ViTEncoder",
    "build_encoder",
    "build_timm_encoder",
    "build_uni_encoder",
    "load_vit_checkpoint",
]
