"""CONCH (MahmoodLab) text tower as a frozen prompt encoder.

CONCH ships as the ``conch`` package (not on PyPI: ``pip install git+https://github.com/Mahmoodlab/CONCH.git``)
and its weights are gated on the Hugging Face hub, so the bundle only reads a local checkpoint file. Its text tower
is a CoCa-style open_clip ``TextTransformer`` (class token appended and pooled), encoded by the shared
:class:`~bundle.text.openclip.TextTransformerTower`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BundleInputError
from .openclip import TextTransformerTower, _TowerAdapter

__all__ = ["CONCHTextEncoder"]

_SHOWN_KEYS = 3

CONCH_INSTALL = "pip install git+https://github.com/Mahmoodlab/CONCH.git"


class CONCHTextEncoder(_TowerAdapter):
    """The frozen CONCH text tower; the image tower and text decoder are dropped after loading.

    Args:
        checkpoint_path: local CONCH checkpoint (``pytorch_model.bin`` from the gated hub repo MahmoodLab/CONCH).
        model_name: CONCH model config name.
    """

    def __init__(self, checkpoint_path: str, model_name: str = "conch_ViT-B-16") -> None:
        try:
            from conch.open_clip_custom import create_model_from_pretrained, get_tokenizer, tokenize
        except ImportError as error:
            raise BundleInputError(
                f"CONCH text encoder needs the `conch` package: {CONCH_INSTALL} (weights: the gated hub repo "
                "MahmoodLab/CONCH, downloaded to a local checkpoint_path)"
            ) from error
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise BundleInputError(f"CONCH checkpoint {path} does not exist (checkpoint_path)")
        try:
            model = create_model_from_pretrained(model_name, checkpoint_path=str(path), return_transform=False)
        except Exception as error:  # unpickling, size and key errors all mean: not a CONCH checkpoint
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise BundleInputError(f"CONCH checkpoint {path} cannot be loaded into {model_name}: {reason}") from error
        _check_text_tower(path, model.text.state_dict())
        tower = TextTransformerTower(model.text)
        del model  # frees the image tower and the text decoder
        self.model_name = model_name
        self.checkpoint_path = path
        self.tokenizer = get_tokenizer()

        def conch_tokenize(texts: list[str]) -> torch.Tensor:
            # CONCH pads one placeholder for its class token and drops it before the tower (CoCa.encode_text)
            return tokenize(self.tokenizer, texts)[:, :-1]

        self._set_tower(tower, self.tokenizer, conch_tokenize)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict as CONCH reads it ("state_dict" wrapper and "module." prefix removed), memory-mapped
    where the file format allows it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return {}
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _check_text_tower(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Every weight of the text tower must come from the file: CONCH loads checkpoints with ``strict=False``, so a
    file without them would leave a randomly initialised text tower and no error."""
    try:
        state = _read_weights(path)
    except Exception as error:  # unreadable after CONCH read it: report it the same way
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise BundleInputError(f"CONCH checkpoint {path} cannot be read: {reason}") from error
    missing = [f"text.{key}" for key in expected if f"text.{key}" not in state]
    if missing:  # (shapes need no check: a wrong shape fails CONCH's own loading, strict or not)
        shown = ", ".join(missing[:_SHOWN_KEYS]) + (", ..." if len(missing) > _SHOWN_KEYS else "")
        raise BundleInputError(
            f"CONCH checkpoint {path} is not a CONCH text tower: {len(missing)} of its {len(expected)} text tower "
            f"weights are missing ({shown}); use the pytorch_model.bin of the hub repo MahmoodLab/CONCH"
        )
