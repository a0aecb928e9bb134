"""open_clip's CoCa as a polymodal captioner: its config (a ``model_cfg`` with ``multimodal_cfg``) and its weights.

An open_clip CoCa is a CLIP (a ViT and a text transformer, converted as ``config_from_open_clip`` converts
them) with three parts of its own, each mapped here:

- the image tower's attentional pooler (``vision_cfg.attentional_pool``): ``attn_pooler_queries`` learned
  queries attend over the ViT's tokens (normalised by the pooler's ``ln_k``, which is polymodal's ViT
  ``norm``) and ``ln_post`` normalises their outputs; the first is the pooled feature, projected to the
  contrastive embedding, the others are the image tokens the decoder reads. That is the ViT's
  ``pool_type="queries"``. Without the pooler (``coca_base``) the class token is pooled and the decoder
  reads the patch tokens;
- the text tower's appended class token (``text_cfg.embed_cls``): its final-normed state is the pooled
  feature, and the decoder reads the other positions' states before that norm. That is the
  ``TextTransformer``'s ``class_token`` with ``pool_type="final_position"``;
- the multimodal decoder (``multimodal_cfg``): per layer a causal self-attention block and a
  cross-attention block, then ``ln_final`` and a projection to ``text_cfg.vocab_size`` logits. That is the
  ``"multimodal"`` decoder, ``MultimodalTextDecoder``.

Whatever polymodal's CoCa cannot reproduce is refused by name (``CheckpointError``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import ComponentConfig, ModelConfig
from .convert_configs import config_from_open_clip, set_if_differs
from .convert_fields import (
    OPEN_CLIP_MODEL_FIELDS,
    OPEN_CLIP_MULTIMODAL_FIELDS,
    OPEN_CLIP_TEXT_FIELDS,
    OPEN_CLIP_VISION_FIELDS,
    resolve_fields,
)

__all__ = ["config_from_open_clip_coca", "split_open_clip_coca", "uses_coca_parts"]

# the CLIP tokenizer's start- and end-of-text ids, which open_clip's CoCa.generate starts and ends captions with
_CLIP_SOT, _CLIP_EOT = 49406, 49407
_POOLER_FIELDS = ("attentional_pool", "attn_pooler_queries", "attn_pooler_heads")


def uses_coca_parts(model_cfg: dict[str, Any]) -> bool:
    """Whether an open_clip ``model_cfg`` is CoCa's or uses one of its parts; ``config_from_open_clip`` then hands
    it to ``config_from_open_clip_coca``."""
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    return (
        model_cfg.get("multimodal_cfg") is not None
        or (isinstance(vision, dict) and bool(vision.get("attentional_pool")))
        or (isinstance(text, dict) and bool(text.get("embed_cls")))
    )


def config_from_open_clip_coca(
    model_cfg: dict[str, Any],
    name: str = "open-clip-coca",
    preprocess: dict[str, Any] | None = None,
    tokenizer_dir: str | None = None,
) -> ModelConfig:
    """A polymodal captioner config (image and text towers, ``"multimodal"`` decoder) of an open_clip CoCa
    ``model_cfg``; arguments as ``config_from_open_clip``. Every field is read against ``convert_fields``
    (``OPEN_CLIP_MULTIMODAL_FIELDS`` for ``multimodal_cfg``); one polymodal cannot reproduce raises a
    ``CheckpointError`` naming it."""
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    top = resolve_fields(model_cfg, OPEN_CLIP_MODEL_FIELDS, "open_clip model_cfg")
    v = resolve_fields(top["vision_cfg"] or {}, OPEN_CLIP_VISION_FIELDS, "vision_cfg")
    t = resolve_fields(top["text_cfg"] or {}, OPEN_CLIP_TEXT_FIELDS, "text_cfg")
    if top["multimodal_cfg"] is None:
        part = "vision_cfg.attentional_pool" if v["attentional_pool"] else "text_cfg.embed_cls"
        raise CheckpointError(
            f"{part} without multimodal_cfg is not supported: polymodal converts open_clip's attentional pooler "
            "and appended class token as parts of a CoCa model (a model_cfg with multimodal_cfg) only"
        )
    m = resolve_fields(top["multimodal_cfg"], OPEN_CLIP_MULTIMODAL_FIELDS, "multimodal_cfg")
    _refuse_unconverted(top, v, t, m)

    # the towers as CLIP's, without CoCa's parts; embed_cls overrides text_cfg.pool_type in open_clip
    clip_cfg = {k: val for k, val in model_cfg.items() if k != "multimodal_cfg"}
    clip_cfg["vision_cfg"] = {k: val for k, val in (top["vision_cfg"] or {}).items() if k not in _POOLER_FIELDS}
    clip_cfg["text_cfg"] = {k: val for k, val in (top["text_cfg"] or {}).items() if k not in ("embed_cls", "pool_type")}
    base = config_from_open_clip(clip_cfg, name, preprocess, tokenizer_dir)

    image = dict(base.towers["image"].args)
    if v["attentional_pool"]:
        image.update(pool_type="queries", pool_heads=v["attn_pooler_heads"], pool_dim=top["embed_dim"])
        set_if_differs(image, "vit", "pool_queries", v["attn_pooler_queries"])
    text = {k: val for k, val in base.towers["text"].args.items() if k != "eos_token_id"}
    text.update(class_token=True, pool_type="final_position")
    decoder = {
        "vocab_size": t["vocab_size"],  # open_clip sizes the decoder's head by the text tower's vocabulary
        "context_length": m["context_length"],
        "width": m["width"],
        "layers": m["layers"],
        "heads": m["heads"],
    }
    if top["quick_gelu"]:
        decoder["act_layer"] = "quick_gelu"
    return dataclasses.replace(
        base,
        kind="captioner",
        towers={"image": ComponentConfig("vit", image), "text": ComponentConfig("text_transformer", text)},
        decoder=ComponentConfig("multimodal", decoder),
    )


def _refuse_unconverted(top: dict[str, Any], v: dict[str, Any], t: dict[str, Any], m: dict[str, Any]) -> None:
    """Refuse, by name, the CoCa fields and field combinations polymodal's CoCa cannot reproduce."""

    def refuse(field: str, value: Any, why: str) -> None:
        raise CheckpointError(f"{field}={value!r} is not supported in a CoCa model_cfg: {why}")

    if v["timm_model_name"]:
        refuse("vision_cfg.timm_model_name", v["timm_model_name"], "CoCa's decoder reads open_clip's own ViT's tokens")
    if isinstance(v["layers"], (list, tuple)):
        refuse("vision_cfg.layers", v["layers"], "CoCa's decoder reads a ViT's tokens, not a ResNet's")
    pool = v["attentional_pool"]
    if not isinstance(pool, bool):
        refuse(
            "vision_cfg.attentional_pool",
            pool,
            "only True converts (open_clip marks its 'parallel' and 'cascade' poolers untested, and their "
            "contrastive feature keeps a query axis)",
        )
    if pool and v["pool_type"] != "tok":
        refuse(
            "vision_cfg.pool_type", v["pool_type"], "with the attentional pooler only 'tok' (its first query) converts"
        )
    if not pool and v["final_ln_after_pool"]:
        refuse("vision_cfg.final_ln_after_pool", True, "the decoder would read the patch tokens without ln_post")
    if t["hf_model_name"] or t["hf_tokenizer_name"]:
        field = "hf_model_name" if t["hf_model_name"] else "hf_tokenizer_name"
        refuse(f"text_cfg.{field}", t[field], "polymodal's CoCa reads open_clip's text transformer and CLIP tokenizer")
    if not t["embed_cls"]:
        refuse(
            "text_cfg.embed_cls", False, "the decoder reads the text tower's states before ln_final, as with embed_cls"
        )
    if t["no_causal_mask"]:
        refuse("text_cfg.no_causal_mask", True, "captioning needs a causal text tower")
    if t["vocab_size"] <= _CLIP_EOT:
        refuse(
            "text_cfg.vocab_size", t["vocab_size"], f"captions start and end with the CLIP ids {_CLIP_SOT}, {_CLIP_EOT}"
        )
    if m["width"] != t["width"]:
        refuse(
            "multimodal_cfg.width",
            m["width"],
            f"the decoder reads the text tower's {t['width']}-wide states as they are",
        )
    image_width = top["embed_dim"] if pool else v["width"]
    if m["width"] != image_width:
        refuse(
            "multimodal_cfg.width", m["width"], f"the decoder reads the image tokens ({image_width} wide) as they are"
        )


# ----------------------------------------------------------------------------------------- weights

_BLOCK = {  # open_clip's ResidualAttentionBlock -> polymodal's Block
    "ln_1.": "norm1.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "ln_2.": "norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_CROSS_BLOCK = {  # open_clip's cross-attention ResidualAttentionBlock -> polymodal's CrossAttentionBlock
    "ln_1.": "norm_q.",
    "ln_1_kv.": "norm_kv.",
    "attn.out_proj.": "attn.proj.",
    "ln_2.": "norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_POOLER = "visual.attn_pool."


def split_open_clip_coca(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CoCa's own tensors of an open_clip state dict, in polymodal keys, and the rest (CLIP's, for
    ``open_clip_to_polymodal``'s tables). A state without them comes back whole, with nothing split off."""
    rest = dict(state)
    ours: dict[str, torch.Tensor] = {}
    if "text.cls_emb" in rest:
        ours["towers.text.cls_token"] = rest.pop("text.cls_emb")
    if f"{_POOLER}query" in rest:
        ours.update(_pooler(rest))
    for key in [k for k in rest if k.startswith("text_decoder.")]:
        ours.update(_decoder_tensors(key, rest.pop(key)))
    return rest, ours


def _pooler(rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attentional pooler's tensors (popped from ``rest``), and ``ln_post``, which normalises its outputs."""
    p, out = _POOLER, {}
    dim = rest[f"{p}query"].shape[1]
    out["towers.image.attn_pool.queries"] = rest.pop(f"{p}query")
    if f"{p}attn.in_proj_weight" in rest:  # nn.MultiheadAttention fuses q, k, v when the tokens are dim wide
        q, k, v = rest.pop(f"{p}attn.in_proj_weight").split(dim)
    else:
        q, k, v = (rest.pop(f"{p}attn.{n}_proj_weight") for n in "qkv")
    bias = rest.pop(f"{p}attn.in_proj_bias")
    out["towers.image.attn_pool.attn.q.weight"] = q
    out["towers.image.attn_pool.attn.kv.weight"] = torch.cat([k, v])  # (2 * dim, width)
    out["towers.image.attn_pool.attn.q.bias"], out["towers.image.attn_pool.attn.kv.bias"] = bias[:dim], bias[dim:]
    for part in ("weight", "bias"):
        out[f"towers.image.attn_pool.attn.proj.{part}"] = rest.pop(f"{p}attn.out_proj.{part}")
        out[f"towers.image.attn_pool.norm_q.{part}"] = rest.pop(f"{p}ln_q.{part}")
        out[f"towers.image.norm.{part}"] = rest.pop(f"{p}ln_k.{part}")
        out[f"towers.image.attn_pool.norm.{part}"] = rest.pop(f"visual.ln_post.{part}")
    return out


def _decoder_tensors(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ``text_decoder.`` tensor in polymodal keys (a cross-attention in-projection becomes two). An unknown
    key is kept as it is, so strict loading names it."""
    name = key.removeprefix("text_decoder.")
    if name == "text_projection":
        return {"decoder.head.weight": value.t().contiguous()}  # (width, vocab) -> nn.Linear's (vocab, width)
    if name.startswith("ln_final."):
        return {"decoder.norm." + name.removeprefix("ln_final."): value}
    group, _, tail = name.partition(".")
    index, _, part = tail.partition(".")
    if group == "resblocks":
        table, where = _BLOCK, f"decoder.layers.{index}.self_block."
    elif group == "cross_attn":
        table, where = _CROSS_BLOCK, f"decoder.layers.{index}.cross_block."
        if part.startswith("attn.in_proj_"):  # (q; k; v) rows: the text states' q, the image tokens' fused kv
            kind, width = part.removeprefix("attn.in_proj_"), value.shape[0] // 3
            return {f"{where}attn.q.{kind}": value[:width], f"{where}attn.kv.{kind}": value[width:]}
    else:
        return {key: value}
    for theirs, mine in table.items():
        if part.startswith(theirs):
            return {where + mine + part[len(theirs) :]: value}
    return {key: value}
