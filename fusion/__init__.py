"""Fusion of per-modality embeddings: concat, attention, cross-attention, contrastive alignment and the losses."""

from .attention import AttentionFusion
from .concat import ConcatFusion
from .contrastive import ContrastiveAlignment
from .cross_attention import CrossAttentionFusion, FusionOutput
from .distillation import DistillationLossOutput, affinity_distillation_loss, feature_distillation_loss
from .distributed import all_gather_with_grad, gather_features
from .losses import ClipLoss, ContrastiveLossOutput, SigLipLoss, clip_loss, siglip_loss

__all__ = [
    "AttentionFusion",
    "ClipLoss",
    "ConcatFusion",
    "ContrastiveAlignment",
    "ContrastiveLossOutput",
    "CrossAttentionFusion",
    "DistillationLossOutput",
    "FusionOutput",
    "SigLipLoss",
    "affinity_distillation_loss",
    "all_gather_with_grad",
    "clip_loss",
    "feature_distillation_loss",
    "gather_features",
    "siglip_loss",
]
