"""Training engine components: the semi-supervised trainer, checkpoints, the run lock, optimizer parameter groups,
handlers.

Modules load on first use, so that ``bundle.engine.handlers`` (used by the inference config) does not import the
trainer and the losses.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GradientAllReduce": "distributed",
    "LogFileHandler": "handlers",
    "QuietStatsHandler": "handlers",
    "TrainingProgressBar": "handlers",
    "RunLock": "run_lock",
    "SemiSupervisedTrainer": "trainer",
    "TrainingCheckpointLoader": "checkpoint",
    "TrainingCheckpointSaver": "checkpoint",
    "acquire_run_lock": "run_lock",
    "ddp_module": "distributed",
    "handlers_for_rank": "distributed",
    "optimizer_param_groups": "optim",
    "warmup_poly_schedule": "optim",
    "rank_shard": "distributed",
    "release_run_lock": "run_lock",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
