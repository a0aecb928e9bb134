"""The trainer: ``polymodal.train.train(config)`` or ``polymodal train CONFIG.yaml`` (contrastive by default,
or any trainer task). ``polymodal.train.classifier.train_classifier`` is a plain loop for any classifier."""

from .config import DataSection, ModelSection, OptimSection, TrainConfig, load_config
from .loop import NonFiniteLossError, Trainer, train

__all__ = [
    "DataSection",
    "ModelSection",
    "NonFiniteLossError",
    "OptimSection",
    "TrainConfig",
    "Trainer",
    "load_config",
    "train",
]
