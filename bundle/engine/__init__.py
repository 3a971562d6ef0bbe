"""Training engine components: the semi-supervised trainer, optimizer parameter groups and small handlers."""

from .handlers import LogFileHandler, TrainingProgressBar
from .optim import optimizer_param_groups
from .trainer import SemiSupervisedTrainer

__all__ = ["LogFileHandler", "SemiSupervisedTrainer", "TrainingProgressBar", "optimizer_param_groups"]
