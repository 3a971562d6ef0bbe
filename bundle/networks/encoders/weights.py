"""Load a local checkpoint file into a timm ViT, with one-line errors that name the file and the mismatching keys."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from bundle.errors import BundleInputError

__all__ = ["load_vit_checkpoint", "read_state_dict"]

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "model.")
_SHOWN_KEYS = 4


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin/.safetensors weight file (plain or wrapped in "state_dict"/"model") on the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BundleInputError(f"encoder checkpoint {path} does not exist")
    try:
        state = load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as error:  # any reader failure means the file is not a usable weight file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BundleInputError(f"encoder checkpoint {path} cannot be read as a weight file: {reason}") from error
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleInputError(f"encoder checkpoint {path} does not hold a state dict of tensors")
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def load_vit_checkpoint(model: nn.Module, path: str | Path, *, arch: str, assign: bool = False) -> None:
    """Load ``path`` strictly into ``model`` (a timm ViT built with ``num_classes=0``).

    Wrapper prefixes ("module.", "model.") are stripped, timm's ViT checkpoint filter adapts formats and resamples a
    position embedding trained at another size, and classifier ("head.") weights are dropped when the model has no
    head. Any other missing, unexpected or wrongly-shaped key raises :class:`BundleInputError` naming the file and
    the first few keys. ``assign=True`` adopts the file's tensors (use it for a model built on the meta device).
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    if isinstance(model, VisionTransformer):
        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as error:  # a foreign file can break the filter's format conversions
            raise BundleInputError(f"encoder checkpoint {path} does not fit {arch}: {error}") from error
    expected = model.state_dict()
    if getattr(model, "num_classes", None) == 0:
        dropped = [key for key in state if key.startswith("head.") and key not in expected]
        if dropped:
            logger.info("ignoring classifier weights %s of %s", _listed(dropped), path)
        state = {key: value for key, value in state.items() if key not in dropped}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} keys with another shape, file vs model ({_listed(wrong_shape)})")
        raise BundleInputError(f"encoder checkpoint {path} does not match {arch}: " + "; ".join(problems))
    if assign:
        state = {key: value.to(dtype=expected[key].dtype) for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    logger.info("loaded %s weights from %s", arch, path)
