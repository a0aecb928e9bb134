"""Every field of the foreign CLIP / SigLIP configs polymodal imports, and what the converter does with it.

Each field of open_clip's ``CLIPVisionCfg``, ``CLIPTextCfg``, ``CLIP`` constructor and ``PreprocessCfg``,
of Hugging Face's ``CLIPConfig``, ``CLIPTextConfig`` and ``CLIPVisionConfig``, and of its ``SiglipConfig``
and ``Siglip2Config`` with their text and vision configs, is one of:

- ``MAP``: translated to a polymodal argument (the note names it), with a parity test;
- ``IGNORE``: it cannot change the imported model's outputs (the note says why);
- ``REFUSE``: polymodal has no equivalent, so any value other than the default is an error naming
  the field.

A field no table lists is refused as well, so a field a newer library adds is never dropped in
silence; ``tests/core/test_convert_fields.py`` fails when the installed open_clip or transformers has a
field (or a default) these tables do not know.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checkpoint import CheckpointError

MAP, IGNORE, REFUSE = "map", "ignore", "refuse"
REQUIRED = object()  # a field without a default


@dataclass(frozen=True)
class Field:
    action: str
    default: Any
    note: str
    also: tuple = ()  # other values that behave exactly like the default


def resolve_fields(given: Mapping[str, Any], table: Mapping[str, Field], where: str) -> dict[str, Any]:
    """``given`` over the table's defaults, after refusing unknown fields and refused non-default values.

    Raises:
        CheckpointError: naming the first field that is unknown, missing or refused, and its value.
    """
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise CheckpointError(
            f"{where} has fields {unknown} that polymodal's converter does not know, so it cannot tell "
            "whether they change the outputs; refusing rather than dropping them"
        )
    for key, field in table.items():
        if field.default is REQUIRED and key not in given:
            raise CheckpointError(f"{where} lacks the required field {key!r}")
        value = given.get(key, field.default)
        if field.action == REFUSE and not is_default(value, field):
            raise CheckpointError(
                f"{where}.{key}={value!r} is not supported: {field.note}; "
                f"only {field.default!r} converts (polymodal would otherwise give different outputs)"
            )
    return {**{k: f.default for k, f in table.items()}, **given}


def is_default(value: Any, field: Field) -> bool:
    if value == field.default or value in field.also:
        return True
    # an empty mapping or list behaves as "none given" in both libraries
    return field.default is None and isinstance(value, (dict, list, tuple)) and not value


# ------------------------------------------------------------------------------------------ open_clip

_TIMM = "with timm_model_name: TimmEncoder"
_HF_TEXT = "with hf_model_name: HFTextEncoder"
_CUSTOM_BLOCK = "open_clip's custom attention block has no polymodal equivalent"

OPEN_CLIP_VISION_FIELDS: dict[str, Field] = {
    "layers": Field(MAP, 12, "vit layers; a list of four selects modified_resnet with those stage depths"),
    "width": Field(MAP, 768, "width"),
    "head_width": Field(MAP, 64, "heads = width // head_width (ViT), width * 32 // head_width (ResNet)"),
    "mlp_ratio": Field(MAP, 4.0, "vit mlp_ratio (ModifiedResNet does not read it)"),
    "patch_size": Field(MAP, 16, "vit patch_size (ModifiedResNet does not read it)"),
    "image_size": Field(MAP, 224, "image_size"),
    "ls_init_value": Field(MAP, None, "vit ls_init_value"),
    "patch_dropout": Field(MAP, 0.0, "vit patch_dropout (active in training only)"),
    # CoCa's parts convert in a CoCa model_cfg (with multimodal_cfg) only: convert_coca, which refuses them elsewhere
    "attentional_pool": Field(
        MAP, False, "True -> vit pool_type 'queries' (convert_coca); 'parallel'/'cascade' are refused"
    ),
    "attn_pooler_queries": Field(MAP, 256, "vit pool_queries, with attentional_pool (open_clip reads it only then)"),
    "attn_pooler_heads": Field(MAP, 8, "vit pool_heads, with attentional_pool (open_clip reads it only then)"),
    "no_ln_pre": Field(MAP, False, "vit pre_norm = not no_ln_pre"),
    # a fixed sin-cos table is a (frozen) parameter saved in the checkpoint like a learned one
    "pos_embed_type": Field(IGNORE, "learnable", "the table itself is in the checkpoint whatever its origin"),
    "final_ln_after_pool": Field(MAP, False, "accepted with token pooling, where it gives the same numbers"),
    "pool_type": Field(MAP, "tok", "vit pool_type: 'tok' -> 'cls', 'avg' -> 'mean'"),
    "output_tokens": Field(IGNORE, False, "adds the token sequence to the tower's return value only"),
    "act_kwargs": Field(MAP, None, "{'approximate': 'tanh'} -> act_layer 'gelu_tanh'"),
    "norm_kwargs": Field(MAP, None, "{'eps': e} -> norm_eps"),
    "block_type": Field(REFUSE, None, _CUSTOM_BLOCK, also=("default",)),
    "qk_norm": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scaled_cosine_attn": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_heads": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_attn_inner": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_attn": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_fc": Field(REFUSE, False, _CUSTOM_BLOCK),
    # a timm tower reads only image_size and the timm_* fields; the ViT fields above are then unused
    "timm_model_name": Field(MAP, None, "a TimmEncoder tower of that timm architecture (the installed timm's)"),
    "timm_model_pretrained": Field(IGNORE, False, "loads timm's own weights before the checkpoint replaces them"),
    "timm_pool": Field(MAP, "avg", f"{_TIMM} pool_type ('' keeps the model's own; attention pools are refused)"),
    "timm_proj": Field(MAP, "linear", f"{_TIMM} proj: 'linear', 'mlp', 'none' -> None, null -> 'head'"),
    "timm_proj_bias": Field(MAP, False, f"{_TIMM} proj_bias"),
    "timm_drop": Field(IGNORE, 0.0, "dropout before the projection, active in training only"),
    "timm_drop_path": Field(MAP, None, f"{_TIMM} drop_path (active in training only)"),
}

OPEN_CLIP_TEXT_FIELDS: dict[str, Field] = {
    "context_length": Field(MAP, 77, "context_length"),
    "vocab_size": Field(MAP, 49408, "vocab_size"),
    "hf_tokenizer_name": Field(MAP, None, "tokenizer 'hf' at tokenizer_dir, else that id in the local HF cache"),
    "tokenizer_mode": Field(REFUSE, None, "polymodal's tokenizers have no tokenizer modes"),
    "tokenizer_kwargs": Field(MAP, None, "{'clean': mode} -> tokenizer clean; other keys are refused"),
    "width": Field(MAP, 512, "width"),
    "heads": Field(MAP, 8, "heads"),
    "layers": Field(MAP, 12, "layers"),
    "mlp_ratio": Field(MAP, 4.0, "mlp_ratio"),
    "ls_init_value": Field(MAP, None, "ls_init_value"),
    "embed_cls": Field(MAP, False, "class_token, pooled with 'final_position' (CoCa only: convert_coca)"),
    # CLIP's causal text tower never reads pad_id; polymodal reads it only for 'last'/'mean' pooling
    "pad_id": Field(MAP, 0, "pad_token_id"),
    "eos_id": Field(MAP, 2, "eos_token_id with pool_type 'eos' (open_clip reads it for nothing else)"),
    # open_clip's CLIP attends to padding when bidirectional; polymodal masks it out
    # open_clip's bidirectional text tower attends to the padding too, as polymodal's mask_padding=False does
    "no_causal_mask": Field(MAP, False, "causal = not no_causal_mask, with mask_padding=False"),
    # open_clip 3.3's _build_text_tower never passes it to TextTransformer
    "final_ln_after_pool": Field(IGNORE, False, "open_clip's CLIP text tower never receives it"),
    "pool_type": Field(
        MAP, "argmax", "pool_type 'argmax', 'eos' (with eos_token_id), 'first', 'last' -> 'final_position'"
    ),
    "proj_bias": Field(MAP, False, "proj_bias"),
    "proj_type": Field(REFUSE, "linear", "a text tower without its projection is not a CLIP text tower here"),
    "output_tokens": Field(IGNORE, False, "adds the token sequence to the tower's return value only"),
    "act_kwargs": Field(MAP, None, "{'approximate': 'tanh'} -> act_layer 'gelu_tanh'"),
    "norm_kwargs": Field(MAP, None, "{'eps': e} -> norm_eps"),
    "block_type": Field(REFUSE, None, _CUSTOM_BLOCK, also=("default",)),
    "qk_norm": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scaled_cosine_attn": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_heads": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_attn_inner": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_attn": Field(REFUSE, False, _CUSTOM_BLOCK),
    "scale_fc": Field(REFUSE, False, _CUSTOM_BLOCK),
    # a Hugging Face text tower reads only these hf_* fields (and hf_tokenizer_name, context_length)
    "hf_model_name": Field(MAP, None, "an HFTextEncoder of that architecture, its config read from the local cache"),
    "hf_model_pretrained": Field(IGNORE, True, "loads the hub weights before the checkpoint replaces them"),
    "hf_proj_type": Field(MAP, "mlp", f"{_HF_TEXT} proj ('linear', 'mlp'; None keeps the width)"),
    "hf_pooler_type": Field(
        MAP, "mean_pooler", f"{_HF_TEXT} pool_type: mean_pooler -> mean, cls_last_hidden_state_pooler -> cls"
    ),
}

# the keys of a model_cfg: the ``CLIP`` constructor's arguments plus the factory's model switches
OPEN_CLIP_MODEL_FIELDS: dict[str, Field] = {
    "embed_dim": Field(MAP, REQUIRED, "embed_dim and both towers' output_dim"),
    "vision_cfg": Field(MAP, None, "the image tower, field by field (OPEN_CLIP_VISION_FIELDS)"),
    "text_cfg": Field(MAP, None, "the text tower, field by field (OPEN_CLIP_TEXT_FIELDS)"),
    "quick_gelu": Field(MAP, False, "act_layer 'quick_gelu' on both towers"),
    "init_logit_scale": Field(MAP, math.log(1 / 0.07), "init_logit_scale"),
    "init_logit_bias": Field(MAP, None, "init_logit_bias"),
    "nonscalar_logit_scale": Field(REFUSE, False, "polymodal keeps the temperature as a scalar"),
    # precision is chosen when open_clip loads a model, never stored in a model_cfg
    "cast_dtype": Field(IGNORE, None, "a load-time precision choice; the weights load as saved"),
    "output_dict": Field(IGNORE, False, "chooses the container open_clip's forward returns"),
    "custom_text": Field(MAP, False, "CustomTextCLIP keeps the text tower's keys under 'text.'; the same tower"),
    "multimodal_cfg": Field(
        MAP, None, "CoCa: a captioner with a 'multimodal' decoder (convert_coca; OPEN_CLIP_MULTIMODAL_FIELDS)"
    ),
}

OPEN_CLIP_PREPROCESS_FIELDS: dict[str, Field] = {
    "size": Field(MAP, 224, "must equal the image tower's image_size"),
    "mode": Field(REFUSE, "RGB", "polymodal's image transform produces RGB"),
    "mean": Field(MAP, (0.48145466, 0.4578275, 0.40821073), "preprocess.mean"),
    "std": Field(MAP, (0.26862954, 0.26130258, 0.27577711), "preprocess.std"),
    "interpolation": Field(MAP, "bicubic", "preprocess.interpolation"),
    "resize_mode": Field(MAP, "shortest", "preprocess.resize_mode"),
    "fill_color": Field(REFUSE, 0, "polymodal's preprocess config has no fill colour"),
}

# open_clip's CoCa decoder (MultimodalCfg: CLIPTextCfg's fields and a few of its own). open_clip 3.3's
# _build_text_decoder_tower reads only context_length, width, heads, layers and ls_init_value (and the model's
# quick_gelu); the decoder's head has text_cfg.vocab_size outputs and an MLP ratio of 4 whatever these say.
_UNREAD = "open_clip's _build_text_decoder_tower never reads it"
OPEN_CLIP_MULTIMODAL_FIELDS: dict[str, Field] = {
    **{name: Field(IGNORE, f.default, _UNREAD, also=f.also) for name, f in OPEN_CLIP_TEXT_FIELDS.items()},
    "context_length": Field(MAP, 77, "multimodal decoder context_length"),
    "width": Field(MAP, 512, "multimodal decoder width (must equal the text and image token widths)"),
    "heads": Field(MAP, 8, "multimodal decoder heads"),
    "layers": Field(MAP, 12, "multimodal decoder layers"),
    "ls_init_value": Field(REFUSE, None, "polymodal's cross-attention blocks have no LayerScale"),
    "mlp_ratio": Field(IGNORE, 4, _UNREAD + " (the decoder's MLP ratio is 4)"),
    "vocab_size": Field(IGNORE, 49408, _UNREAD + " (the head is sized by text_cfg.vocab_size)"),
    "dim_head": Field(IGNORE, 64, _UNREAD),
    "n_queries": Field(IGNORE, 256, _UNREAD + " (the pooler's are vision_cfg.attn_pooler_queries)"),
    "attn_pooler_heads": Field(IGNORE, 8, _UNREAD + " (the pooler's are vision_cfg.attn_pooler_heads)"),
}

# ------------------------------------------------------------------------------------- Hugging Face

_GENERIC = "a PretrainedConfig runtime or bookkeeping setting that CLIP's and SigLIP's encoders never read"
_GENERATION = "a generation setting (old config files carry them); CLIP and SigLIP do not generate"
_INIT = "initialisation only; the weights come from the checkpoint"
_LEGACY_GENERATION = [
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "decoder_start_token_id",
]

# PretrainedConfig's own fields (transformers 5) and those older versions wrote into every config.json
_HF_GENERIC: dict[str, Field] = {
    "model_type": Field(MAP, None, "checked against the config's kind, e.g. 'clip', 'clip_text_model'"),
    "_name_or_path": Field(IGNORE, "", _GENERIC),
    "architectures": Field(IGNORE, None, _GENERIC),
    "transformers_version": Field(IGNORE, None, _GENERIC),
    "output_attentions": Field(IGNORE, False, "chooses what HF's forward returns"),
    "output_hidden_states": Field(IGNORE, False, "chooses what HF's forward returns"),
    "return_dict": Field(IGNORE, True, "chooses what HF's forward returns"),
    "dtype": Field(IGNORE, None, "the dtype HF loads into; polymodal loads the tensors as saved"),
    "torch_dtype": Field(IGNORE, None, "the dtype HF loads into; polymodal loads the tensors as saved"),
    "use_bfloat16": Field(IGNORE, False, _GENERIC),
    "torchscript": Field(IGNORE, False, _GENERIC),
    "tf_legacy_loss": Field(IGNORE, False, "a TensorFlow training setting"),
    "_attn_implementation_autoset": Field(IGNORE, False, "kernel choice; the same attention numbers"),
    # chunking the feed-forward over the sequence computes the same numbers in pieces
    "chunk_size_feed_forward": Field(IGNORE, 0, "a memory setting with identical results"),
    "is_encoder_decoder": Field(IGNORE, False, _GENERIC),
    "is_decoder": Field(IGNORE, False, _GENERIC),
    "add_cross_attention": Field(IGNORE, False, _GENERIC),
    "cross_attention_hidden_size": Field(IGNORE, None, _GENERIC),
    "tie_encoder_decoder": Field(IGNORE, False, _GENERIC),
    "tie_word_embeddings": Field(IGNORE, True, "CLIP and SigLIP have no language-model head to tie"),
    "pruned_heads": Field(REFUSE, {}, "polymodal's attention keeps every head", also=(None,)),
    "id2label": Field(IGNORE, None, "classification heads only"),
    "label2id": Field(IGNORE, None, "classification heads only"),
    "problem_type": Field(IGNORE, None, "classification heads only"),
    "finetuning_task": Field(IGNORE, None, _GENERIC),
    "task_specific_params": Field(IGNORE, None, _GENERIC),
    "prefix": Field(IGNORE, None, _GENERIC),
    "tokenizer_class": Field(IGNORE, None, "tokenizers are read from the directory's own files"),
    "sep_token_id": Field(IGNORE, None, "CLIP's text model reads only eos_token_id; SigLIP's no token id"),
    "gradient_checkpointing": Field(IGNORE, False, "trades memory for compute, same numbers"),
    "dropout": Field(IGNORE, 0.0, "old CLIP configs carried it; no CLIP or SigLIP module reads it"),
    **{name: Field(IGNORE, None, _GENERATION) for name in _LEGACY_GENERATION},
}

HF_TEXT_FIELDS: dict[str, Field] = {
    **_HF_GENERIC,
    "vocab_size": Field(MAP, 49408, "vocab_size"),
    "hidden_size": Field(MAP, 512, "width"),
    "intermediate_size": Field(MAP, 2048, "mlp_ratio = intermediate_size / hidden_size"),
    "projection_dim": Field(IGNORE, 512, "CLIPModel projects to the top-level projection_dim"),
    "num_hidden_layers": Field(MAP, 12, "layers"),
    "num_attention_heads": Field(MAP, 8, "heads"),
    "max_position_embeddings": Field(MAP, 77, "context_length"),
    "hidden_act": Field(MAP, "quick_gelu", "act_layer"),
    "layer_norm_eps": Field(MAP, 1e-5, "norm_eps"),
    "attention_dropout": Field(MAP, 0.0, "attn_drop (active in training only)"),
    "initializer_range": Field(IGNORE, 0.02, _INIT),
    "initializer_factor": Field(IGNORE, 1.0, _INIT),
    "pad_token_id": Field(MAP, 1, "pad_token_id"),
    "bos_token_id": Field(IGNORE, 49406, "the tokenizer's start token; pooling reads eos_token_id"),
    "eos_token_id": Field(MAP, 49407, "pool_type 'eos' at eos_token_id ('argmax' for the legacy id 2)"),
}

HF_VISION_FIELDS: dict[str, Field] = {
    **_HF_GENERIC,
    "hidden_size": Field(MAP, 768, "width"),
    "intermediate_size": Field(MAP, 3072, "mlp_ratio = intermediate_size / hidden_size"),
    "projection_dim": Field(IGNORE, 512, "CLIPModel projects to the top-level projection_dim"),
    "num_hidden_layers": Field(MAP, 12, "layers"),
    "num_attention_heads": Field(MAP, 12, "heads"),
    "num_channels": Field(MAP, 3, "in_chans"),
    "image_size": Field(MAP, 224, "image_size"),
    "patch_size": Field(MAP, 32, "patch_size"),
    "hidden_act": Field(MAP, "quick_gelu", "act_layer"),
    "layer_norm_eps": Field(MAP, 1e-5, "norm_eps"),
    "attention_dropout": Field(MAP, 0.0, "attn_drop (active in training only)"),
    "initializer_range": Field(IGNORE, 0.02, _INIT),
    "initializer_factor": Field(IGNORE, 1.0, _INIT),
}

HF_MODEL_FIELDS: dict[str, Field] = {
    **_HF_GENERIC,
    "text_config": Field(MAP, None, "the text tower, field by field (HF_TEXT_FIELDS)"),
    "vision_config": Field(MAP, None, "the image tower, field by field (HF_VISION_FIELDS)"),
    # transformers < 4.27 wrote the towers' non-default fields here, over text_config / vision_config
    "text_config_dict": Field(MAP, None, "merged over text_config, as transformers does"),
    "vision_config_dict": Field(MAP, None, "merged over vision_config, as transformers does"),
    "projection_dim": Field(MAP, 512, "embed_dim and both towers' output_dim"),
    "logit_scale_init_value": Field(MAP, 2.6592, "init_logit_scale"),
    "initializer_factor": Field(IGNORE, 1.0, _INIT),
}

# SigLIP (https://arxiv.org/abs/2303.15343) as transformers builds it: a bidirectional text tower that attends
# to its padding and pools the final position, a ViT with an attention-pooling head, and the sigmoid loss's
# logit scale and bias (weights only: SiglipConfig has no field for their initial values).
_SIGLIP_POOL = "SigLIP pools the final position and reads no token id"

SIGLIP_TEXT_FIELDS: dict[str, Field] = {
    **_HF_GENERIC,
    "vocab_size": Field(MAP, 32000, "vocab_size"),
    "hidden_size": Field(MAP, 768, "width"),
    "intermediate_size": Field(MAP, 3072, "mlp_ratio = intermediate_size / hidden_size"),
    "num_hidden_layers": Field(MAP, 12, "layers"),
    "num_attention_heads": Field(MAP, 12, "heads"),
    "max_position_embeddings": Field(MAP, 64, "context_length, which the tokenizer pads every text to"),
    "hidden_act": Field(MAP, "gelu_pytorch_tanh", "act_layer"),
    "layer_norm_eps": Field(MAP, 1e-6, "norm_eps"),
    "attention_dropout": Field(MAP, 0.0, "attn_drop (active in training only)"),
    "pad_token_id": Field(MAP, 1, "pad_token_id (read by token_mask only: SigLIP attends to its padding)"),
    "bos_token_id": Field(IGNORE, 49406, _SIGLIP_POOL),
    "eos_token_id": Field(IGNORE, 49407, _SIGLIP_POOL),
    "projection_size": Field(MAP, None, "output_dim of the text head (a Linear with bias); None: hidden_size"),
}

SIGLIP_VISION_FIELDS: dict[str, Field] = {
    **_HF_GENERIC,
    "hidden_size": Field(MAP, 768, "width, and embed_dim: SigLIP's image embedding is the head's output"),
    "intermediate_size": Field(MAP, 3072, "mlp_ratio = intermediate_size / hidden_size (blocks and head)"),
    "num_hidden_layers": Field(MAP, 12, "layers"),
    "num_attention_heads": Field(MAP, 12, "heads (blocks and head)"),
    "num_channels": Field(MAP, 3, "in_chans"),
    "image_size": Field(MAP, 224, "image_size (an int: SigLIP's position table is a square grid)"),
    "patch_size": Field(MAP, 16, "patch_size (an int)"),
    "hidden_act": Field(MAP, "gelu_pytorch_tanh", "act_layer"),
    "layer_norm_eps": Field(MAP, 1e-6, "norm_eps"),
    "attention_dropout": Field(MAP, 0.0, "attn_drop (active in training only)"),
    "vision_use_head": Field(REFUSE, True, "without its attention-pooling head SigLIP has no image embedding"),
}

SIGLIP_MODEL_FIELDS: dict[str, Field] = {
    **_HF_GENERIC,
    "text_config": Field(MAP, None, "the text tower, field by field (SIGLIP_TEXT_FIELDS)"),
    "vision_config": Field(MAP, None, "the image tower, field by field (SIGLIP_VISION_FIELDS)"),
    "initializer_factor": Field(IGNORE, 1.0, _INIT),
}

# Siglip2 (NaFlex) embeds flattened patches with a Linear and resizes its square position table to each
# image's patch grid. At the table's own grid that is SigLIP's ViT, which is what is imported.
SIGLIP2_VISION_FIELDS: dict[str, Field] = {
    **{k: f for k, f in SIGLIP_VISION_FIELDS.items() if k != "image_size"},
    "num_patches": Field(
        MAP, 256, "a square number: image_size = sqrt(num_patches) * patch_size, the native grid imported"
    ),
}
