"""Training: one model-agnostic trainer, regex parameter groups, atomic checkpoints and HTML reports."""

from vlkit.train.checkpoint import load_checkpoint, load_latest, save_checkpoint
from vlkit.train.optim import ParamGroupRule, build_param_groups, count_parameters, lr_lambda
from vlkit.train.report import plot_confusion_matrix, plot_retrieval_grid, write_report
from vlkit.train.trainer import ResumableSamplerProtocol, StepOutput, TrainConfig, Trainer, TrainResult

__all__ = [
    "ParamGroupRule",
    "ResumableSamplerProtocol",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_param_groups",
    "count_parameters",
    "load_checkpoint",
    "load_latest",
    "lr_lambda",
    "plot_confusion_matrix",
    "plot_retrieval_grid",
    "save_checkpoint",
    "write_report",
]
