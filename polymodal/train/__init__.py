"""The trainer: ``polymodal.train.train(config)`` or ``polymodal train CONFIG.yaml`` (contrastive by default,
or any trainer task). ``polymodal.train.classifier.train_classifier`` is a plain loop for any classifier.

Commands that rebuild a run's data (``polymodal evaluate``) use ``build_datasets``: the datasets a
``DataSection`` describes, with the built-in data's zero-shot prompts."""

from .config import DataSection, ModelSection, OptimSection, TrainConfig, load_config
from .data import RunData, build_datasets
from .loop import NonFiniteLossError, Trainer, train

__all__ = [
    "DataSection",
    "ModelSection",
    "NonFiniteLossError",
    "OptimSection",
    "RunData",
    "TrainConfig",
    "Trainer",
    "build_datasets",
    "load_config",
    "train",
]
