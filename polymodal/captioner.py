"""The captioner of the core: ``polymodal.tasks.ImageCaptioner`` built from, and saved with, a ``ModelConfig``.

A model config of kind ``"captioner"`` holds an image tower, a ``decoder`` and optionally a text tower
(CoCa-style, with the contrastive alignment built as for ``ContrastiveModel``). The decoder is a
``"transformer"`` (``CaptionDecoder``, over token ids) or a ``"multimodal"`` one (``MultimodalTextDecoder``,
CoCa's as open_clip builds it, over the text tower's states; it needs the text tower).
"""

from __future__ import annotations

from torch import nn

from polymodal.fusion import ContrastiveAlignment
from polymodal.tasks.captioning import ImageCaptioner, decoder_memory_dim

from .checkpoint import PretrainedMixin
from .config import ComponentConfig, ModelConfig, build_component, build_encoder, decoder_types, validate_component
from .model import ResizableTowersMixin, alignment_from_config

__all__ = ["CaptioningModel"]


class CaptioningModel(ResizableTowersMixin, PretrainedMixin, ImageCaptioner):
    """An image captioner (``polymodal.tasks.ImageCaptioner``) built from, and saved with, a ``ModelConfig``.

    Args:
        image_encoder: the image tower; the decoder attends to its tokens (``ImageCaptioner.image_tokens``).
        decoder: the caption decoder.
        text_encoder: the text tower of a CoCa-style model, or ``None``.
        alignment: the contrastive projections and temperature, with ``text_encoder``.
        config: the config the model was built from (kept for ``save_pretrained``).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        decoder: nn.Module,
        text_encoder: nn.Module | None = None,
        alignment: ContrastiveAlignment | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__(image_encoder, decoder, text_encoder, alignment)
        self.config = config

    @classmethod
    def from_config(cls, config: ModelConfig, device=None, dtype=None) -> CaptioningModel:
        towers = {m: build_encoder(c, device=device, dtype=dtype) for m, c in config.towers.items()}
        table = decoder_types()
        validate_component(config.decoder, table, "decoder")  # here, not in ModelConfig: the class lives in tasks
        memory_dim = decoder_memory_dim(towers["image"], table[config.decoder.type])
        decoder_cfg = ComponentConfig(config.decoder.type, {"memory_dim": memory_dim, **config.decoder.args})
        decoder = build_component(decoder_cfg, table, device, dtype)
        alignment = alignment_from_config(config, towers, device, dtype) if "text" in towers else None
        return cls(towers["image"], decoder, towers.get("text"), alignment, config)
