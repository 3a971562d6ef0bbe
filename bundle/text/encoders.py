"""Factory for the frozen text encoders of the prompt learner, by kind (``huggingface``, ``open_clip``, ``conch``, and
``random``: the control with fixed random features)."""

from __future__ import annotations

import inspect

from ..errors import BundleInputError
from .base import TextEncoderAdapter
from .conch import CONCHTextEncoder
from .huggingface import HuggingFaceTextEncoder
from .openclip import OpenCLIPTextEncoder
from .random_features import RandomTextFeatures

__all__ = [
    "CONCHTextEncoder",
    "HuggingFaceTextEncoder",
    "OpenCLIPTextEncoder",
    "RandomTextFeatures",
    "TEXT_ENCODERS",
    "TextEncoderAdapter",
    "build_text_encoder",
]

TEXT_ENCODERS: dict[str, type[TextEncoderAdapter]] = {
    "huggingface": HuggingFaceTextEncoder,
    "open_clip": OpenCLIPTextEncoder,
    "conch": CONCHTextEncoder,
    "random": RandomTextFeatures,
}


def build_text_encoder(kind: str, **kwargs) -> TextEncoderAdapter:
    """Build the text encoder adapter of ``kind`` with its keyword options (see each adapter's arguments)."""
    if kind not in TEXT_ENCODERS:
        raise BundleInputError(f"text encoder kind {kind!r} is unknown; use one of: {', '.join(TEXT_ENCODERS)}")
    adapter_class = TEXT_ENCODERS[kind]
    try:
        inspect.signature(adapter_class).bind(**kwargs)
    except TypeError as error:
        raise BundleInputError(f"text encoder {kind!r}: {error} (options: {', '.join(kwargs) or 'none'})") from error
    return adapter_class(**kwargs)
