"""Image captioning: transformer caption decoders (over token ids, or CoCa's over a text tower's states),
generation (greedy, beam, sampling), BLEU / CIDEr-D, plots."""

from .decoder import (
    CaptionDecoder,
    CaptionDecoderBlock,
    DecoderCache,
    caption_loss,
    caption_target_mask,
    used_target_length,
)
from .generation import BeamSearchOutput, beam_search, filter_logits, generate, greedy_search, sample
from .metrics import BleuScore, CiderScore, caption_words, cider_d, corpus_bleu, ngram_counts
from .model import CaptionOutput, ImageCaptioner, decoder_memory_dim
from .multimodal_decoder import MultimodalDecoderLayer, MultimodalTextDecoder, TextTowerCache, TextTowerDecoder

_PLOTS = ("caption_figure", "plot_captions")  # matplotlib loads on first use, not when a CoCa is built


def __getattr__(name: str):
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BeamSearchOutput",
    "BleuScore",
    "CaptionDecoder",
    "CaptionDecoderBlock",
    "CaptionOutput",
    "CiderScore",
    "DecoderCache",
    "ImageCaptioner",
    "MultimodalDecoderLayer",
    "MultimodalTextDecoder",
    "TextTowerCache",
    "TextTowerDecoder",
    "beam_search",
    "caption_figure",
    "caption_loss",
    "caption_target_mask",
    "caption_words",
    "cider_d",
    "corpus_bleu",
    "decoder_memory_dim",
    "filter_logits",
    "generate",
    "greedy_search",
    "ngram_counts",
    "plot_captions",
    "sample",
    "used_target_length",
]
