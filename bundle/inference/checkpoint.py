"""Loading trained weights into the inference network, with one clear line when the file is missing or does not fit.

Accepted files: ``models/model.pt`` (a plain state dict of ``network_def``, what training writes), MONAI's
``{"model": state_dict}`` (``checkpoint.get("model", checkpoint)``, as MONAI Label reads it) and the bundle's
resumable ``runs/checkpoints/{best,last}.pt`` (``{"network": state_dict, "optimizer": ..., ...}``). Files are read
with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events

from ..errors import BundleInputError

__all__ = ["CheckpointWeightsLoader", "load_network_weights", "network_state_dict"]

STATE_KEYS = ("model", "network")
logger = logging.getLogger(__name__)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return network.module
    return network


def _examples(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def network_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's state dict stored in ``path`` (see the module docstring for the accepted layouts)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise BundleInputError(
            f"model weights file {path} {what}; train the bundle first (it writes models/model.pt) "
            "or give another file with --ckpt_path"
        )
    if os.path.getsize(path) == 0:
        raise BundleInputError(f"model weights file {path} is empty (0 bytes): an interrupted copy or download?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = " ".join(str(err).split())[:300] or "the file is truncated or not a PyTorch checkpoint"
        raise BundleInputError(f"cannot read model weights file {path}: {text} ({type(err).__name__})") from err
    state = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in STATE_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                state = checkpoint[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleInputError(f"model weights file {path} holds no network state dict (expected a dict of tensors)")
    return dict(state)


def load_network_weights(network: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> torch.nn.Module:
    """Load ``path`` into ``network`` (unwrapping DataParallel/DDP) and return ``network``.

    With ``strict`` every parameter and buffer must be present with the same shape and the file must hold nothing
    else; otherwise only the entries present in both with the same shape are loaded (MONAI Label's non-strict load
    still needs equal shapes). A mismatch raises :class:`BundleInputError` naming the file and a few keys.
    """
    path = os.fspath(path)
    state = network_state_dict(path)
    target = _unwrap(network)
    expected = target.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    reshaped = [k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if reshaped:
        key = sorted(reshaped)[0]
        problems.append(
            f"{len(reshaped)} tensors have other shapes (e.g. {key}: {tuple(state[key].shape)} in the file, "
            f"{tuple(expected[key].shape)} in the network)"
        )
    if strict and missing:
        problems.append(f"{len(missing)} network tensors are missing ({_examples(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} tensors are not in the network ({_examples(unexpected)})")
    if problems:
        raise BundleInputError(
            f"model weights in {path} do not fit the network: {'; '.join(problems)}; were they trained with the same "
            "network options (num_classes, encoder, encoder_kwargs, patch_size, head_channels, decoder_channels, "
            "embedding_dim)?"
        )
    target.load_state_dict(state, strict=strict)
    logger.info("loaded model weights from %s", path)
    return network


class CheckpointWeightsLoader:
    """An engine handler that loads ``load_path`` into ``network`` when the engine starts (once).

    The file is checked when the handler is built, so a missing file fails before any image is read.
    :meth:`load` may also be called directly (the tiled path for large images runs outside the evaluator).
    """

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module, strict: bool = True) -> None:
        self.load_path = os.fspath(load_path)
        self.network = network
        self.strict = strict
        self.loaded = False
        if not os.path.isfile(self.load_path):
            network_state_dict(self.load_path)  # raises the one-line error

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _engine: self.load())

    def load(self) -> torch.nn.Module:
        if not self.loaded:
            load_network_weights(self.network, self.load_path, strict=self.strict)
            self.loaded = True
        return self.network
