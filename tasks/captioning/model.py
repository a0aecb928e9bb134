"""An image captioner: an image encoder, a caption decoder, and optionally a text tower (CoCa-style).

With only an image encoder, the model is a plain captioner trained by teacher forcing. With a text
encoder and a ``ContrastiveAlignment`` as well, ``forward`` also returns normalised image and text
embeddings, so one training step can add the contrastive loss to the captioning loss (CoCa,
https://arxiv.org/abs/2205.01917). The image tokens are computed once and serve both the decoder
and, for a ViT, the pooled image embedding.

The decoder is one of two kinds. A ``CaptionDecoder`` embeds the caption ids itself and attends to the
image encoder's ``forward_features`` tokens. A ``MultimodalTextDecoder`` (CoCa as open_clip builds it)
reads the text tower's states instead, and the image tokens a ViT's ``pool_with_tokens`` leaves beside
its pooled feature (CoCa's attentional pooler outputs); one text tower pass then serves the decoder and
the text embedding, and generation drives the two together (``caption_decoder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...encoders import VisionTransformer
from ...fusion import ContrastiveAlignment
from .decoder import CaptionDecoder
from .generation import generate
from .multimodal_decoder import MultimodalTextDecoder, TextTowerDecoder, check_text_tower


def decoder_memory_dim(image_encoder: nn.Module, decoder_type: type[nn.Module]) -> int:
    """Width of the image tokens a decoder of ``decoder_type`` reads from ``image_encoder``: the encoder's
    ``width`` (its ``forward_features``) for a ``CaptionDecoder``, a ViT's ``pool_dim`` (its
    ``pool_with_tokens``) for a ``MultimodalTextDecoder``."""
    if issubclass(decoder_type, MultimodalTextDecoder):
        if not isinstance(image_encoder, VisionTransformer):
            raise ValueError(
                f"a MultimodalTextDecoder reads the tokens a ViT leaves beside its pooled feature; "
                f"the image encoder is a {type(image_encoder).__name__}"
            )
        return image_encoder.pool_dim
    return image_encoder.width


@dataclass
class CaptionOutput:
    """What ``ImageCaptioner.forward`` returns.

    Attributes:
        caption_logits: ``(M, num_tokens)`` next-token logits at the ``M`` positions that predict a
            caption token (see ``CaptionDecoder.teacher_forcing``).
        caption_targets: ``(M,)`` the output columns those positions should predict (the token ids
            themselves unless the decoder has a ``token_ids`` vocabulary).
        embeddings: L2-normalised ``{"image", "text"}`` embeddings ``(B, embed_dim)`` of a model with a
            text tower; empty otherwise.
        logit_scale: the contrastive temperature multiplier, or ``None`` without a text tower.
        logit_bias: the sigmoid-loss bias, or ``None``.
    """

    caption_logits: torch.Tensor
    caption_targets: torch.Tensor
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None


class ImageCaptioner(nn.Module):
    """Image encoder + caption decoder, with an optional contrastive text tower.

    Args:
        image_encoder: an encoder whose ``forward_features`` gives ``(B, N, width)`` tokens; the width of
            the tokens the decoder reads (``decoder_memory_dim``) must equal its ``memory_dim``.
        decoder: the caption decoder, a ``CaptionDecoder`` or a ``MultimodalTextDecoder`` (which needs a
            ViT image encoder and a causal ``TextTransformer`` text encoder of its width).
        text_encoder: a text encoder for the contrastive objective (CoCa), or ``None``.
        alignment: projections of the pooled image and text features into one space, with the
            temperature; required with ``text_encoder``.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        decoder: CaptionDecoder | MultimodalTextDecoder,
        text_encoder: nn.Module | None = None,
        alignment: ContrastiveAlignment | None = None,
    ) -> None:
        super().__init__()
        if (text_encoder is None) != (alignment is None):
            raise ValueError("a text encoder and a contrastive alignment go together: give both or neither")
        width = decoder_memory_dim(image_encoder, type(decoder))
        if width != decoder.memory_dim:
            raise ValueError(
                f"the image encoder's tokens are {width} wide but the decoder expects memory_dim={decoder.memory_dim}"
            )
        if isinstance(decoder, MultimodalTextDecoder):
            check_text_tower(text_encoder, decoder)
        towers = {"image": image_encoder} if text_encoder is None else {"image": image_encoder, "text": text_encoder}
        self.towers = nn.ModuleDict(towers)
        self.decoder = decoder
        self.alignment = alignment

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    # ------------------------------------------------------------------ encoders

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """What the decoder attends to, ``(B, N, memory_dim)`` (see the module docstring)."""
        return self._image_features(image, pooled=False)[0]

    def _image_features(self, image: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's image tokens, and with ``pooled`` the image tower's embedding (``forward``'s)."""
        encoder = self.towers["image"]
        tokens = encoder.forward_features(image)
        if isinstance(self.decoder, MultimodalTextDecoder):
            feature, tokens = encoder.pool_with_tokens(tokens)  # (B, pool_dim), (B, N', pool_dim)
        elif not pooled:
            return tokens, None
        elif isinstance(encoder, VisionTransformer):  # pool the tokens already computed instead of a second pass
            feature = encoder.pool(tokens)
        else:
            return tokens, encoder(image)
        if not pooled:
            return tokens, None
        return tokens, (encoder.proj(feature) if encoder.proj is not None else feature)

    @property
    def caption_decoder(self) -> CaptionDecoder | TextTowerDecoder:
        """What generation drives (ids in, next-token logits out): the decoder, or a ``MultimodalTextDecoder``
        together with the text tower whose states it reads."""
        if isinstance(self.decoder, MultimodalTextDecoder):
            return TextTowerDecoder(self.towers["text"], self.decoder)
        return self.decoder

    def teacher_forcing(self, text: torch.Tensor, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's ``teacher_forcing`` logits and targets of captions ``text (B, L)`` over ``image_tokens``
        (from ``image_tokens``), reading the text tower's states for a ``MultimodalTextDecoder``."""
        if isinstance(self.decoder, MultimodalTextDecoder):
            return self.decoder.teacher_forcing(text, self.towers["text"].forward_hidden(text), image_tokens)
        return self.decoder.teacher_forcing(text, image_tokens)

    def encode(self, modality: str, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Embed ``x`` into the contrastive space (models with a text tower only)."""
        if self.alignment is None:
            raise ValueError("this captioner has no text tower, so no contrastive embedding space")
        if modality not in self.towers:
            raise ValueError(f"this model has no {modality!r} tower; it has {self.modalities}")
        return self.alignment({modality: self.towers[modality](x)}, normalize=normalize)[modality]

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("image", image, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("text", text, normalize)

    # ------------------------------------------------------------------ training

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> CaptionOutput:
        """Teacher-forced caption logits for ``image (B, 3, H, W)`` and its caption ``text (B, L)``,
        plus contrastive embeddings when the model has a text tower."""
        tokens, image_feature = self._image_features(image, pooled=self.alignment is not None)
        if isinstance(self.decoder, MultimodalTextDecoder):  # one text tower pass for the decoder and the embedding
            states = self.towers["text"].forward_hidden(text)  # (B, L + class token, width)
            logits, targets = self.decoder.teacher_forcing(text, states, tokens)
            text_feature = self.towers["text"].embed_hidden(states, text)
        else:
            logits, targets = self.decoder.teacher_forcing(text, tokens)
            text_feature = self.towers["text"](text) if self.alignment is not None else None
        if self.alignment is None:
            return CaptionOutput(caption_logits=logits, caption_targets=targets)
        features = {"image": image_feature, "text": text_feature}
        return CaptionOutput(
            caption_logits=logits,
            caption_targets=targets,
            embeddings=self.alignment(features, normalize=True),
            logit_scale=self.alignment.scale(),
            logit_bias=self.alignment.logit_bias,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    def lock_tower(self, modality: str, unlocked_layers: int = 0, freeze_norm: bool = False) -> None:
        """Freeze one tower, optionally leaving its last ``unlocked_layers`` groups trainable."""
        if modality not in self.towers:
            raise ValueError(f"this model has no {modality!r} tower; it has {self.modalities}")
        self.towers[modality].lock(unlocked_layers=unlocked_layers, freeze_norm=freeze_norm)

    # ------------------------------------------------------------------ captions

    @torch.no_grad()
    def generate(self, image: torch.Tensor, **kwargs) -> torch.Tensor:
        """Caption ids ``(B, T)`` for ``image (B, 3, H, W)``; keyword arguments as ``generation.generate``."""
        return generate(self.caption_decoder, self.image_tokens(image), **kwargs)

    @torch.no_grad()
    def caption(self, image: torch.Tensor, tokenizer, **kwargs) -> list[str]:
        """Caption text per image, decoded with ``tokenizer`` (its ``batch_decode``)."""
        return list(tokenizer.batch_decode(self.generate(image, **kwargs).cpu()))
