"""TransUNet encoder presets ("hybrid", "timm", "uni") and the factory that builds one by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from bundle.errors import BundleInputError

from .base import EncoderOutput, TransUNetEncoder
from .hybrid import HybridEncoder
from .vit import UNI_ARCH, UNI_HUB_ID, SkipAdapter, ViTEncoder, build_timm_encoder, build_uni_encoder
from .weights import load_vit_checkpoint, read_state_dict

__all__ = [
    "ENCODER_PRESETS",
    "UNI_ARCH",
    "UNI_HUB_ID",
    "EncoderOutput",
    "HybridEncoder",
    "SkipAdapter",
    "TransUNetEncoder",
    "ViTEncoder",
    "build_encoder",
    "build_timm_encoder",
    "build_uni_encoder",
    "load_vit_checkpoint",
    "read_state_dict",
]

ENCODER_PRESETS: dict[str, Callable[..., TransUNetEncoder]] = {
    "hybrid": HybridEncoder,
    "timm": build_timm_encoder,
    "uni": build_uni_encoder,
}


def _check_options(name: str, builder: Callable[..., TransUNetEncoder], options: dict) -> None:
    parameters = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # extra options go on to timm
    accepted = [key for key in parameters if key not in ("img_size", "in_channels")]
    unknown = sorted(key for key in options if key not in accepted)
    if unknown:
        raise BundleInputError(
            f"encoder {name!r} does not take encoder_kwargs {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )


def build_encoder(name: str, img_size: int = 256, in_channels: int = 3, **encoder_kwargs) -> TransUNetEncoder:
    """Build the encoder preset ``name`` for ``img_size`` (pretraining/grid size) and ``in_channels`` inputs."""
    builder = ENCODER_PRESETS.get(name)
    if builder is None:
        raise BundleInputError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_PRESETS)}")
    _check_options(name, builder, encoder_kwargs)
    return builder(img_size=img_size, in_channels=in_channels, **encoder_kwargs)
