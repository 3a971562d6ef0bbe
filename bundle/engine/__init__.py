"""Training engine components: the semi-supervised trainer, checkpoints, optimizer parameter groups, handlers.

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
    "SemiSupervisedTrainer": "trainer",
    "TrainingCheckpointLoader": "checkpoint",
    "TrainingCheckpointSaver": "checkpoint",
    "ddp_module": "distributed",
    "handlers_for_rank": "distributed",
    "optimizer_param_groups": "optim",
    "warmup_poly_schedule": "optim",
    "rank_shard": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
