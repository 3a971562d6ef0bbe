"""Resumable training checkpoints: ``last.pt`` after every few epochs, ``best.pt`` (and ``model.pt``) on a new best.

:class:`TrainingCheckpointSaver` writes, and :class:`TrainingCheckpointLoader` restores, one format: the state dict
of every object in ``save_dict`` (network, optimizer, LR scheduler, criterion with its prototype bank and prompt
context), the trainer's state (epoch, iteration, the unlabelled loader's epoch), the AMP grad scaler and the
validation evaluator's best metric. Together with the trainer's per-epoch seeding (``seed`` of
:class:`~bundle.engine.trainer.SemiSupervisedTrainer`) a run resumed from ``last.pt`` repeats what the uninterrupted
run would have done.

MONAI's ``CheckpointSaver`` cannot hold the trainer itself when it is declared in the trainer's own config (a
circular reference), and ignite's ``Checkpoint`` deletes the previous file before writing a fixed-name one. These
handlers are attached to the trainer, add its state themselves, and every file is replaced atomically (ignite's
``DiskSaver``, only rank 0 writes: a temporary file next to it, synced, then renamed), so a killed run always leaves
complete files. A write that fails (a full disk, no permission) removes its temporary file, keeps the previous file
and stops training with a :class:`~bundle.errors.BundleInputError` naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver

from bundle.errors import BundleInputError

__all__ = ["TrainingCheckpointLoader", "TrainingCheckpointSaver"]

logger = logging.getLogger(__name__)

TRAINER_KEY, SCALER_KEY, EVALUATOR_KEY = "trainer", "scaler", "evaluator"


def _unwrapped(obj: Any) -> Any:
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


class _AtomicDiskSaver(DiskSaver):
    """ignite's atomic ``DiskSaver`` that also cleans up when the data cannot be flushed or renamed (ignite only does
    while ``torch.save`` runs) and syncs the file before the rename, so the final name only ever holds a whole file."""

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dirname)
        os.close(handle)
        try:
            with open(temporary, "wb") as stream:
                func(checkpoint, stream, **self.kwargs)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise
        with contextlib.suppress(OSError):  # written already; readable by the group and others where allowed
            os.chmod(path, os.stat(path).st_mode | stat.S_IRGRP | stat.S_IROTH)


def _save(disk: DiskSaver, obj: Any, path: str) -> None:
    """Write ``obj`` to ``path`` with ``disk``; a failing write (full disk, no permission) becomes one clear error."""
    try:
        disk(obj, os.path.basename(path))
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise BundleInputError(f"cannot write {path}: {reason} (the file was left as it was)") from error


def _evaluator_state(evaluator: Engine | None) -> dict[str, Any] | None:
    if evaluator is None or getattr(evaluator.state, "best_metric_epoch", -1) < 0:
        return None
    return {
        "best_metric": float(evaluator.state.best_metric),
        "best_metric_epoch": int(evaluator.state.best_metric_epoch),
    }


class TrainingCheckpointSaver:
    """Save ``save_dict`` plus the trainer's state so that training can resume from the file.

    Args:
        save_dir: folder of the checkpoint files (created if missing).
        save_dict: objects with ``state_dict()`` (network, optimizer, lr_scheduler, criterion, ...); ``None``
            values are skipped. The engine the handler is attached to is added as ``"trainer"`` and its AMP grad
            scaler, when it has one, as ``"scaler"``.
        evaluator: the validation engine; when its key metric reaches a new best in the current epoch,
            ``best_filename`` (and ``model_path``) is written (None: no best checkpoint).
        save_interval: write ``last_filename`` every this many epochs (and always when training completes).
        last_filename, best_filename: file names inside ``save_dir``.
        model_path: where to write the best network alone, as a plain state dict (the bundle's ``models/model.pt``);
            None: not written.
        network_key: the ``save_dict`` entry written to ``model_path``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        evaluator: Engine | None = None,
        save_interval: int = 1,
        last_filename: str = "last.pt",
        best_filename: str = "best.pt",
        model_path: str | None = None,
        network_key: str = "network",
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.save_dir = save_dir
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        if model_path is not None and network_key not in self.save_dict:
            raise ValueError(f"model_path needs the network in save_dict under {network_key!r}")
        self.evaluator = evaluator
        self.save_interval = int(save_interval)
        self.last_filename = last_filename
        self.best_filename = best_filename
        self.model_path = model_path
        self.network_key = network_key
        self._disk: DiskSaver | None = None
        self._model_disk: DiskSaver | None = None

    def attach(self, engine: Engine) -> None:
        self._disk = self._saver(self.save_dir)
        if self.model_path is not None:
            self._model_disk = self._saver(os.path.dirname(os.path.abspath(self.model_path)))
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval) | Events.COMPLETED, self.save_last)
        if self.evaluator is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    @staticmethod
    def _saver(folder: str) -> DiskSaver:
        try:
            return _AtomicDiskSaver(folder, atomic=True, create_dir=True, require_empty=False)
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            raise BundleInputError(f"cannot create the checkpoint folder {folder}: {reason}") from error

    def checkpoint(self, engine: Engine) -> dict[str, Any]:
        """The dictionary written to disk: every object's state dict plus the trainer's (and scaler, evaluator)."""
        state = {name: _unwrapped(obj).state_dict() for name, obj in self.save_dict.items()}
        state[TRAINER_KEY] = engine.state_dict()
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            state[SCALER_KEY] = scaler.state_dict()
        evaluator = _evaluator_state(self.evaluator)
        if evaluator is not None:
            state[EVALUATOR_KEY] = evaluator
        return state

    def save_last(self, engine: Engine) -> None:
        self._write(engine, self.last_filename)

    def save_best(self, engine: Engine) -> None:
        state = self.evaluator.state
        best_epoch = getattr(state, "best_metric_epoch", -1)
        if best_epoch == engine.state.epoch and getattr(state, "best_metric", None) is not None:
            self._write(engine, self.best_filename)
            if self._model_disk is not None:
                network = _unwrapped(self.save_dict[self.network_key])
                _save(self._model_disk, network.state_dict(), os.path.abspath(self.model_path))
            logger.info("best checkpoint: %s = %.4f at epoch %d", state.key_metric_name, state.best_metric, best_epoch)

    def _write(self, engine: Engine, filename: str) -> None:
        if self._disk is None:
            raise RuntimeError("TrainingCheckpointSaver.attach(engine) must be called before saving")
        _save(self._disk, self.checkpoint(engine), os.path.join(os.path.abspath(self.save_dir), filename))


class TrainingCheckpointLoader:
    """Resume training from a checkpoint written by :class:`TrainingCheckpointSaver` when the trainer starts.

    Args:
        load_path: the checkpoint (``<output_dir>/checkpoints/last.pt``).
        load_dict: the same objects as the saver's ``save_dict``; each must be in the checkpoint.
        evaluator: the validation engine; its best metric so far is restored, so that ``best.pt`` and
            ``model.pt`` are only replaced by a better network.
        enabled: False turns the handler off (the config's ``resume`` flag).
        missing_ok: with no file at ``load_path``, log it and train from the start (True) or stop with an error.
        map_location: passed to ``torch.load`` (default: the trainer's device).

    The trainer keeps the configured ``max_epochs`` (a resumed run may train longer than the first one) but must
    use the checkpoint's ``epoch_length``.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, Any],
        evaluator: Engine | None = None,
        enabled: bool = True,
        missing_ok: bool = True,
        map_location: str | torch.device | None = None,
    ) -> None:
        self.load_path = load_path
        self.load_dict = {k: v for k, v in load_dict.items() if v is not None}
        self.evaluator = evaluator
        self.enabled = bool(enabled)
        self.missing_ok = bool(missing_ok)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def _read(self, device: torch.device) -> dict[str, Any] | None:
        if not os.path.isfile(self.load_path):
            if self.missing_ok:
                logger.info("resume: no checkpoint at %s, training from the start", self.load_path)
                return None
            raise BundleInputError(f"resume: no checkpoint at {self.load_path}")
        if os.path.getsize(self.load_path) == 0:
            raise BundleInputError(f"resume: checkpoint {self.load_path} is empty (0 bytes)")
        try:
            checkpoint = torch.load(self.load_path, map_location=self.map_location or device, weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which and why, in one line
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BundleInputError(f"resume: cannot read checkpoint {self.load_path}: {reason}") from error
        missing = sorted((set(self.load_dict) | {TRAINER_KEY}) - set(checkpoint))
        if missing:
            raise BundleInputError(f"resume: checkpoint {self.load_path} lacks {', '.join(missing)}")
        return checkpoint

    def __call__(self, engine: Engine) -> None:
        checkpoint = self._read(torch.device(getattr(engine.state, "device", None) or "cpu"))
        if checkpoint is None:
            return
        trainer_state = checkpoint[TRAINER_KEY]
        if trainer_state.get("epoch_length") != engine.state.epoch_length:
            raise BundleInputError(
                f"resume: checkpoint {self.load_path} was written with epoch_length {trainer_state.get('epoch_length')}"
                f", this run uses {engine.state.epoch_length}; resume with the same epoch_length"
            )
        for name, obj in self.load_dict.items():
            try:
                _unwrapped(obj).load_state_dict(checkpoint[name])
            except (RuntimeError, ValueError, KeyError) as error:
                first = str(error).strip().splitlines()[0]
                raise BundleInputError(
                    f"resume: checkpoint {self.load_path} does not fit this configuration ({name}: {first})"
                ) from error
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and SCALER_KEY in checkpoint:
            scaler.load_state_dict(checkpoint[SCALER_KEY])
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(trainer_state)
        if engine.state.epoch > max_epochs:
            raise BundleInputError(
                f"resume: checkpoint {self.load_path} is at epoch {engine.state.epoch}, beyond max_epochs {max_epochs}"
            )
        engine.state.max_epochs = max_epochs
        evaluator_state = checkpoint.get(EVALUATOR_KEY)
        if self.evaluator is not None and evaluator_state is not None:
            self.evaluator.state.best_metric = evaluator_state["best_metric"]
            self.evaluator.state.best_metric_epoch = evaluator_state["best_metric_epoch"]
        logger.info(
            "resumed from %s: epoch %d, iteration %d", self.load_path, engine.state.epoch, engine.state.iteration
        )
