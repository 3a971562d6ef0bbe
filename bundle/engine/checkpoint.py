"""Resumable training checkpoints: ``last.pt`` every few epochs and at the end, ``best.pt`` on a new best metric.

MONAI's ``CheckpointSaver`` cannot hold the trainer itself when it is declared in the trainer's own config (a
circular reference), and ignite's ``Checkpoint`` deletes the previous file before writing a fixed-name one. This
handler is attached to the trainer, adds the trainer's state to what it saves, and replaces each file atomically
(ignite's ``DiskSaver`` writes a temporary file and renames it), so a killed run always leaves a complete file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver

__all__ = ["TrainingCheckpointSaver"]

logger = logging.getLogger(__name__)


def _state_dict(obj: Any) -> Any:
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        obj = obj.module
    return obj.state_dict()


class TrainingCheckpointSaver:
    """Save ``save_dict`` plus the trainer's state so that training can resume from the file.

    Args:
        save_dir: folder of the checkpoint files (created if missing).
        save_dict: objects with ``state_dict()`` (network, optimizer, lr_scheduler, criterion, ...); ``None``
            values are skipped. The engine the handler is attached to is added as ``"trainer"``.
        evaluator: the validation engine; when its key metric reaches a new best in the current epoch,
            ``best_filename`` is written (None: no best checkpoint).
        save_interval: write ``last_filename`` every this many epochs (and always when training completes).
        last_filename, best_filename: file names inside ``save_dir``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        evaluator: Engine | None = None,
        save_interval: int = 1,
        last_filename: str = "last.pt",
        best_filename: str = "best.pt",
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.save_dir = save_dir
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.evaluator = evaluator
        self.save_interval = int(save_interval)
        self.last_filename = last_filename
        self.best_filename = best_filename
        self._disk: DiskSaver | None = None

    def attach(self, engine: Engine) -> None:
        self._disk = DiskSaver(self.save_dir, atomic=True, create_dir=True, require_empty=False)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval) | Events.COMPLETED, self.save_last)
        if self.evaluator is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    def checkpoint(self, engine: Engine) -> dict[str, Any]:
        """The dictionary written to disk: every object's state dict plus the trainer's."""
        state = {name: _state_dict(obj) for name, obj in self.save_dict.items()}
        state["trainer"] = engine.state_dict()
        return state

    def save_last(self, engine: Engine) -> None:
        self._write(engine, self.last_filename)

    def save_best(self, engine: Engine) -> None:
        state = self.evaluator.state
        best_epoch = getattr(state, "best_metric_epoch", -1)
        if best_epoch == engine.state.epoch and getattr(state, "best_metric", None) is not None:
            self._write(engine, self.best_filename)
            logger.info("best checkpoint: %s = %.4f at epoch %d", state.key_metric_name, state.best_metric, best_epoch)

    def _write(self, engine: Engine, filename: str) -> None:
        if self._disk is None:
            raise RuntimeError("TrainingCheckpointSaver.attach(engine) must be called before saving")
        self._disk(self.checkpoint(engine), filename)
