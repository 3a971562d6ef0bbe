"""Text prototypes for MPAMatch: frozen text encoder adapters and the CoOp-style prompt learner."""

from __future__ import annotations

from .base import TextEncoderAdapter
from .conch import CONCHTextEncoder
from .encoders import TEXT_ENCODERS, build_text_encoder
from .huggingface import HuggingFaceTextEncoder
from .openclip import OpenCLIPTextEncoder, TextTransformerTower
from .prompt_learner import PromptLearner

__all__ = [
    "CONCHTextEncoder",
    "HuggingFaceTextEncoder",
    "OpenCLIPTextEncoder",
    "PromptLearner",
    "TEXT_ENCODERS",
    "TextEncoderAdapter",
    "TextTransformerTower",
    "build_text_encoder",
]
