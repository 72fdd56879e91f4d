"""Training: `train` (dense or masked, optionally penalised or distilled) and `evaluate`."""

from .metrics_log import MetricsLog
from .trainer import (OPTIMIZERS, GradientPenalty, ScheduleWindow, TrainConfig, TrainResult, evaluate,
                      steps_per_epoch, train)

__all__ = ["MetricsLog", "OPTIMIZERS", "GradientPenalty", "ScheduleWindow", "TrainConfig", "TrainResult", "evaluate",
           "steps_per_epoch", "train"]
