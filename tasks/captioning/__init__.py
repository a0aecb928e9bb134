"""Image captioning: a transformer caption decoder, generation (greedy, beam, sampling), BLEU / CIDEr-D, plots."""

from .decoder import CaptionDecoder, CaptionDecoderBlock, DecoderCache, caption_loss, caption_target_mask
from .generation import BeamSearchOutput, beam_search, filter_logits, generate, greedy_search, sample
from .metrics import BleuScore, CiderScore, caption_words, cider_d, corpus_bleu, ngram_counts
from .model import CaptionOutput, ImageCaptioner
from .plots import caption_figure, plot_captions

__all__ = [
    "BeamSearchOutput",
    "BleuScore",
    "CaptionDecoder",
    "CaptionDecoderBlock",
    "CaptionOutput",
    "CiderScore",
    "DecoderCache",
    "ImageCaptioner",
    "beam_search",
    "caption_figure",
    "caption_loss",
    "caption_target_mask",
    "caption_words",
    "cider_d",
    "corpus_bleu",
    "filter_logits",
    "generate",
    "greedy_search",
    "ngram_counts",
    "plot_captions",
    "sample",
]
