"""Per-modality encoders: image (ViT, CNN, timm), text (Transformer, Hugging Face) and audio (spectrogram CNN),
with their tokenizers and preprocessing. Depends on nothing else in polymodal."""

from .attention import (
    Attention,
    Block,
    CrossAttentionBlock,
    Mlp,
    Transformer,
    attention_weights,
    mlp_hidden_dim,
    record_attention,
)
from .audio import AudioSpectrogramCNN, LogMelSpectrogram
from .base import Encoder
from .hf_text import HFTextEncoder
from .layers import QuickGELU
from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AudioPreprocess,
    ToRGB,
    image_transform,
    load_audio,
)
from .resnet import AttentionPool2d, ResNetEncoder, TorchvisionResNetEncoder
from .text import TextTransformer
from .timm_encoder import TimmEncoder
from .tokenizer import CLIPTokenizer, HFTokenizer, Tokenizer, clean_text
from .vit import VisionTransformer
from .weights import CheckpointError, load_state_dict_strict, load_weights_file, read_state_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Attention",
    "AttentionPool2d",
    "AudioPreprocess",
    "AudioSpectrogramCNN",
    "Block",
    "CLIPTokenizer",
    "CheckpointError",
    "CrossAttentionBlock",
    "Encoder",
    "HFTextEncoder",
    "HFTokenizer",
    "LogMelSpectrogram",
    "Mlp",
    "QuickGELU",
    "ResNetEncoder",
    "TextTransformer",
    "TimmEncoder",
    "TorchvisionResNetEncoder",
    "ToRGB",
    "Tokenizer",
    "Transformer",
    "VisionTransformer",
    "attention_weights",
    "clean_text",
    "image_transform",
    "load_audio",
    "load_state_dict_strict",
    "load_weights_file",
    "mlp_hidden_dim",
    "read_state_dict",
    "record_attention",
]
