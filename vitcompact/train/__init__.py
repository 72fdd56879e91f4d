"""Training: `train` (dense or masked, optionally penalised or distilled) and `evaluate`."""

from .metrics_log import MetricsLog
from .trainer import OPTIMIZERS, GradientPenalty, TrainConfig, TrainResult, evaluate, train

__all__ = ["MetricsLog", "OPTIMIZERS", "GradientPenalty", "TrainConfig", "TrainResult", "evaluate", "train"]
