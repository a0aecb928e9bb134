"""Tasks on top of encoders and fusion: zero-shot classification, retrieval metrics and plots."""

from .plots import plot_confusion, plot_curves, plot_retrieval_grid, plot_similarity_matrix
from .retrieval_metrics import image_text_retrieval_metrics, recall_at_k, retrieval_metrics, retrieval_ranks
from .templates import (
    AUDIO_TEMPLATES,
    IMAGE_ENSEMBLE_TEMPLATES,
    SIMPLE_IMAGE_TEMPLATES,
    TEMPLATE_SETS,
    check_templates,
    get_templates,
)
from .zero_shot import (
    ZeroShotClassifier,
    ZeroShotResult,
    build_zero_shot_classifier,
    evaluate_zero_shot,
    meta_label_fn,
    zero_shot_accuracy,
)

__all__ = [
    "AUDIO_TEMPLATES",
    "IMAGE_ENSEMBLE_TEMPLATES",
    "SIMPLE_IMAGE_TEMPLATES",
    "TEMPLATE_SETS",
    "ZeroShotClassifier",
    "ZeroShotResult",
    "build_zero_shot_classifier",
    "check_templates",
    "evaluate_zero_shot",
    "get_templates",
    "image_text_retrieval_metrics",
    "meta_label_fn",
    "plot_confusion",
    "plot_curves",
    "plot_retrieval_grid",
    "plot_similarity_matrix",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_ranks",
    "zero_shot_accuracy",
]
