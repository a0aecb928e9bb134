"""Tasks on top of encoders and fusion: zero-shot classification, classification heads and linear probes,
retrieval metrics, held-out evaluation (one dataset-embedding loop), captioning, explanations and plots."""

from .attention_maps import attention_rollout, gradient_rollout
from .benchmark import (
    BENCHMARK_TASKS,
    BenchmarkResult,
    format_benchmark,
    linear_probe_benchmark,
    retrieval_benchmark,
    zero_shot_benchmark,
)
from .captioning import (
    CaptionDecoder,
    CaptionOutput,
    ImageCaptioner,
    MultimodalTextDecoder,
    beam_search,
    caption_loss,
    cider_d,
    corpus_bleu,
    generate,
    greedy_search,
    sample,
)
from .classification import (
    BatchLabels,
    ClassificationHead,
    ClassificationResult,
    classification_metrics,
    default_top_k,
    evaluate_classifier,
    model_logits,
)
from .embedding import EmbeddedData, embed_dataset, eval_mode
from .evaluation import (
    RetrievalExamples,
    caption_choice_metrics,
    caption_matches,
    evaluate_contrastive,
    format_metrics,
    label_indices,
    plot_retrieval_examples,
    retrieval_verdicts,
    zero_shot_on_labels,
)
from .explain import (
    EXPLANATION_METHODS,
    default_method,
    explain,
    explanation_methods,
    input_spectrogram,
    normalize_maps,
    resolve_method,
)
from .index import EmbeddingIndex, IndexMismatchError, SearchResult, model_identity
from .linear_probe import (
    DEFAULT_WEIGHT_DECAY,
    DEFAULT_WEIGHT_DECAYS,
    LinearProbe,
    extract_features,
    fit_linear_probe,
    split_validation,
)
from .pointing_game import PointingScore, pointing_game, pointing_hits
from .retrieval_metrics import image_text_retrieval_metrics, recall_at_k, retrieval_metrics, retrieval_ranks
from .templates import (
    AUDIO_TEMPLATES,
    IMAGE_ENSEMBLE_TEMPLATES,
    SIMPLE_IMAGE_TEMPLATES,
    TEMPLATE_SETS,
    check_templates,
    get_templates,
)
from .vector_search import FaissSearcher, exact_search
from .zero_shot import (
    ZeroShotClassifier,
    ZeroShotResult,
    build_zero_shot_classifier,
    evaluate_zero_shot,
    meta_label_fn,
    zero_shot_accuracy,
)

# Plotting pulls in matplotlib (and so does captum, which the explanations import when they run); it loads on
# first use so that building a model (a CoCa imports the caption decoder from here) or embedding data never
# does. Name -> the module that holds it.
_PLOTS = dict.fromkeys(
    (
        "curves_figure",
        "plot_confusion",
        "plot_curves",
        "plot_retrieval_grid",
        "plot_similarity_matrix",
        "retrieval_grid_figure",
    ),
    "plots",
)
_PLOTS |= dict.fromkeys(
    ("explanation_figure", "explanation_grid_figure", "plot_explanation", "plot_explanation_grid"), "explain_plots"
)


def __getattr__(name: str):
    if name in _PLOTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_PLOTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUDIO_TEMPLATES",
    "BENCHMARK_TASKS",
    "BatchLabels",
    "BenchmarkResult",
    "CaptionDecoder",
    "CaptionOutput",
    "ClassificationHead",
    "ClassificationResult",
    "DEFAULT_WEIGHT_DECAY",
    "DEFAULT_WEIGHT_DECAYS",
    "EXPLANATION_METHODS",
    "EmbeddedData",
    "EmbeddingIndex",
    "FaissSearcher",
    "IMAGE_ENSEMBLE_TEMPLATES",
    "ImageCaptioner",
    "IndexMismatchError",
    "LinearProbe",
    "MultimodalTextDecoder",
    "PointingScore",
    "RetrievalExamples",
    "SIMPLE_IMAGE_TEMPLATES",
    "SearchResult",
    "TEMPLATE_SETS",
    "ZeroShotClassifier",
    "ZeroShotResult",
    "attention_rollout",
    "beam_search",
    "build_zero_shot_classifier",
    "caption_loss",
    "caption_choice_metrics",
    "caption_matches",
    "check_templates",
    "cider_d",
    "classification_metrics",
    "corpus_bleu",
    "curves_figure",
    "default_method",
    "default_top_k",
    "embed_dataset",
    "eval_mode",
    "evaluate_classifier",
    "evaluate_contrastive",
    "evaluate_zero_shot",
    "exact_search",
    "explain",
    "explanation_figure",
    "explanation_grid_figure",
    "explanation_methods",
    "extract_features",
    "fit_linear_probe",
    "format_benchmark",
    "format_metrics",
    "generate",
    "get_templates",
    "gradient_rollout",
    "greedy_search",
    "image_text_retrieval_metrics",
    "input_spectrogram",
    "label_indices",
    "linear_probe_benchmark",
    "meta_label_fn",
    "model_identity",
    "model_logits",
    "normalize_maps",
    "plot_confusion",
    "plot_curves",
    "plot_explanation",
    "plot_explanation_grid",
    "plot_retrieval_examples",
    "plot_retrieval_grid",
    "plot_similarity_matrix",
    "pointing_game",
    "pointing_hits",
    "recall_at_k",
    "resolve_method",
    "retrieval_benchmark",
    "retrieval_grid_figure",
    "retrieval_metrics",
    "retrieval_ranks",
    "retrieval_verdicts",
    "sample",
    "split_validation",
    "zero_shot_accuracy",
    "zero_shot_benchmark",
    "zero_shot_on_labels",
]
