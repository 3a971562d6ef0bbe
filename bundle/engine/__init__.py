"""Training engine components: the semi-supervised trainer, optimizer parameter groups and small handlers."""

from .checkpoint import TrainingCheckpointSaver
from .handlers import LogFileHandler, TrainingProgressBar
from .optim import optimizer_param_groups
from .trainer import SemiSupervisedTrainer

__all__ = [
    "LogFileHandler",
    "SemiSupervisedTrainer",
    "TrainingCheckpointSaver",
    "TrainingProgressBar",
    "optimizer_param_groups",
]
