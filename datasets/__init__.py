"""Data: image-text and audio-text pairs from index files or WebDataset shards, robust decoding that
skips and counts bad samples, and the built-in synthetic ``shapes`` and ``tones`` data.

Uses only the leaf modules of the project: ``polymodal.media`` (RGB conversion, audio loading and
resampling, shared with the encoders' preprocessing), ``polymodal.errors`` and ``polymodal.fileio``.
"""

from .benchmark_layouts import (
    BenchmarkLayoutError,
    CaptionedImage,
    CaptionedImageDataset,
    ClipBenchmarkWds,
    WdsBenchmarkDataset,
    read_clip_benchmark_wds,
    read_karpathy,
)
from .decode import decode_audio, decode_caption, decode_image
from .folder import ImageFolderDataset
from .pairs import AudioTextDataset, ImageTextDataset, read_index
from .samples import (
    SKIP_REASONS,
    Batch,
    SampleError,
    SkipBudget,
    SkipBudgetExceeded,
    SkipLogger,
    SkippedSample,
    TooManyBadSamples,
    collate_samples,
    log_skips,
)
from .shape_pointing import PointingSample, shape_pointing_samples
from .synthetic import SYNTHETIC_KINDS, write_synthetic
from .synthetic_shapes import (
    COLOURS,
    SHAPES,
    UNSEEN_COMBOS,
    ShapeSample,
    ShapesDataset,
    colour_prompts,
    combo_prompts,
    make_shape_sample,
    shape_masks,
    shape_prompts,
)
from .synthetic_tones import (
    TONE_PATTERNS,
    TONE_PITCHES,
    TONE_WAVEFORMS,
    UNSEEN_TONE_COMBOS,
    ToneSample,
    TonesDataset,
    make_tone_sample,
    tone_prompts,
)
from .wds import WebDatasetPairs, expand_shard_urls, write_wds_shards

__all__ = [
    "COLOURS",
    "SHAPES",
    "SKIP_REASONS",
    "SYNTHETIC_KINDS",
    "TONE_PATTERNS",
    "TONE_PITCHES",
    "TONE_WAVEFORMS",
    "UNSEEN_COMBOS",
    "UNSEEN_TONE_COMBOS",
    "AudioTextDataset",
    "Batch",
    "BenchmarkLayoutError",
    "CaptionedImage",
    "CaptionedImageDataset",
    "ClipBenchmarkWds",
    "ImageFolderDataset",
    "ImageTextDataset",
    "PointingSample",
    "SampleError",
    "ShapeSample",
    "ShapesDataset",
    "SkipBudget",
    "SkipBudgetExceeded",
    "SkipLogger",
    "SkippedSample",
    "ToneSample",
    "TonesDataset",
    "TooManyBadSamples",
    "WdsBenchmarkDataset",
    "WebDatasetPairs",
    "collate_samples",
    "colour_prompts",
    "combo_prompts",
    "decode_audio",
    "decode_caption",
    "decode_image",
    "expand_shard_urls",
    "log_skips",
    "make_shape_sample",
    "make_tone_sample",
    "read_clip_benchmark_wds",
    "read_index",
    "read_karpathy",
    "shape_masks",
    "shape_pointing_samples",
    "shape_prompts",
    "tone_prompts",
    "write_synthetic",
    "write_wds_shards",
]
