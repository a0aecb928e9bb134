"""Contrastive training: ``polymodal.train.train(config)`` or ``polymodal train CONFIG.yaml``."""

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
