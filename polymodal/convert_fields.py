"""Every field of the foreign CLIP configs polymodal imports, and what the converter does with it.

Each field of open_clip's ``CLIPVisionCfg``, ``CLIPTextCfg``, ``CLIP`` constructor and ``PreprocessCfg``,
and of Hugging Face's ``CLIPConfig``, ``CLIPTextConfig`` and ``CLIPVisionConfig``, is one of:

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

_ONLY_TIMM = "read only with timm_model_name, which is refused"
_ONLY_HF = "read only with hf_model_name, which is refused"
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
    "attentional_pool": Field(REFUSE, False, "the attentional pooler (CoCa) has no polymodal equivalent"),
    "attn_pooler_queries": Field(IGNORE, 256, "read only with attentional_pool, which is refused"),
    "attn_pooler_heads": Field(IGNORE, 8, "read only with attentional_pool, which is refused"),
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
    "timm_model_name": Field(REFUSE, None, "timm image towers inside open_clip checkpoints are not converted"),
    "timm_model_pretrained": Field(IGNORE, False, _ONLY_TIMM),
    "timm_pool": Field(IGNORE, "avg", _ONLY_TIMM),
    "timm_proj": Field(IGNORE, "linear", _ONLY_TIMM),
    "timm_proj_bias": Field(IGNORE, False, _ONLY_TIMM),
    "timm_drop": Field(IGNORE, 0.0, _ONLY_TIMM),
    "timm_drop_path": Field(IGNORE, None, _ONLY_TIMM),
}

OPEN_CLIP_TEXT_FIELDS: dict[str, Field] = {
    "context_length": Field(MAP, 77, "context_length"),
    "vocab_size": Field(MAP, 49408, "vocab_size"),
    "hf_tokenizer_name": Field(MAP, None, "tokenizer 'hf' at tokenizer_dir, else that id in the local HF cache"),
    "tokenizer_mode": Field(REFUSE, None, "polymodal's tokenizers have no tokenizer modes"),
    "tokenizer_kwargs": Field(REFUSE, None, "polymodal's tokenizer config takes no extra tokenizer options"),
    "width": Field(MAP, 512, "width"),
    "heads": Field(MAP, 8, "heads"),
    "layers": Field(MAP, 12, "layers"),
    "mlp_ratio": Field(MAP, 4.0, "mlp_ratio"),
    "ls_init_value": Field(MAP, None, "ls_init_value"),
    "embed_cls": Field(REFUSE, False, "an appended class token (CoCa) has no polymodal text equivalent"),
    # CLIP's causal text tower never reads pad_id; polymodal reads it only for 'last'/'mean' pooling
    "pad_id": Field(MAP, 0, "pad_token_id"),
    "eos_id": Field(MAP, 2, "eos_token_id with pool_type 'eos' (open_clip reads it for nothing else)"),
    # open_clip's CLIP attends to padding when bidirectional; polymodal masks it out
    "no_causal_mask": Field(REFUSE, False, "open_clip's bidirectional CLIP text attends to padding tokens"),
    # open_clip 3.3's _build_text_tower never passes it to TextTransformer
    "final_ln_after_pool": Field(IGNORE, False, "open_clip's CLIP text tower never receives it"),
    "pool_type": Field(MAP, "argmax", "pool_type 'argmax', 'eos' (with eos_token_id) or 'first'"),
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
    "hf_model_name": Field(REFUSE, None, "Hugging Face text towers inside open_clip checkpoints are not converted"),
    "hf_model_pretrained": Field(IGNORE, True, _ONLY_HF),
    "hf_proj_type": Field(IGNORE, "mlp", _ONLY_HF),
    "hf_pooler_type": Field(IGNORE, "mean_pooler", _ONLY_HF),
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
    "custom_text": Field(REFUSE, False, "CustomTextCLIP checkpoints are not converted"),
    "multimodal_cfg": Field(REFUSE, None, "CoCa's multimodal decoder is not converted"),
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

# ------------------------------------------------------------------------------------- Hugging Face

_GENERIC = "a PretrainedConfig runtime or bookkeeping setting that CLIP's encoders never read"
_GENERATION = "a generation setting (old config files carry them); CLIP does not generate"
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
    "model_type": Field(MAP, None, "checked: 'clip', 'clip_text_model' or 'clip_vision_model'"),
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
    "tie_word_embeddings": Field(IGNORE, True, "CLIP has no language-model head to tie"),
    "pruned_heads": Field(REFUSE, {}, "polymodal's attention keeps every head", also=(None,)),
    "id2label": Field(IGNORE, None, "classification heads only"),
    "label2id": Field(IGNORE, None, "classification heads only"),
    "problem_type": Field(IGNORE, None, "classification heads only"),
    "finetuning_task": Field(IGNORE, None, _GENERIC),
    "task_specific_params": Field(IGNORE, None, _GENERIC),
    "prefix": Field(IGNORE, None, _GENERIC),
    "tokenizer_class": Field(IGNORE, None, "tokenizers are read from the directory's own files"),
    "sep_token_id": Field(IGNORE, None, "CLIP's text model reads only eos_token_id"),
    "gradient_checkpointing": Field(IGNORE, False, "trades memory for compute, same numbers"),
    "dropout": Field(IGNORE, 0.0, "old CLIP configs carried it; no CLIP module reads it"),
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
