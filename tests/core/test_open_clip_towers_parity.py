"""open_clip models with timm image towers (ConvNeXt, SigLIP's ViT with a MAP head, ...) and CustomTextCLIP text
towers (SigLIP's bidirectional, final-position text) import from an open_clip directory with equal outputs.

References are open_clip's own models with random weights, built here; timm's architectures come from the
installed timm (its tiny ``test_*`` models for the small configs)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP
from safetensors.torch import save_file

import polymodal
from polymodal.checkpoint import CheckpointError
from tests.helpers import cache_repo

TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every weight off its initial value (zero-initialised heads included), so a missed key shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("logit_scale", "logit_bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def save_open_clip(model: torch.nn.Module, model_cfg: dict, directory, preprocess: dict | None = None):
    directory.mkdir()
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors")
    )
    return directory


def build(model_cfg: dict) -> torch.nn.Module:
    cls = CustomTextCLIP if model_cfg.get("custom_text") else CLIP
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("custom_text",)}
    torch.manual_seed(0)
    return perturbed(cls(**kwargs))


def assert_parity(model, ref, size: int, vocab: int, context: int, pad: int = 0, eos: int | None = None) -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, size, size, generator=g)
    ids = torch.randint(1, vocab - 1, (3, context), generator=g)  # below the highest id, which may be the eos
    ids[0, 5:] = pad  # a padded row
    if eos is not None:  # every tokenized text ends with it
        ids[0, 4], ids[1:, -1] = eos, eos
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)


SMALL = {
    # ConvNeXt with open_clip's linear head; timm_pool '' keeps the trunk's own pooling
    "convnext-linear": {
        "embed_dim": 24,
        "vision_cfg": {"timm_model_name": "test_convnext", "timm_pool": "", "timm_proj": "linear", "image_size": 160},
        "text_cfg": TEXT,
    },
    # the MLP head with a biased last layer and another pool
    "convnext-mlp": {
        "embed_dim": 24,
        "vision_cfg": {
            "timm_model_name": "test_convnext",
            "timm_pool": "avg",
            "timm_proj": "mlp",
            "timm_proj_bias": True,
            "timm_drop_path": 0.1,
            "image_size": 160,
        },
        "text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 99},
    },
    # SigLIP's shape: a ViT with timm's MAP head and no projection; a bidirectional text tower read at the last
    # position, with a biased projection; the sigmoid bias
    "siglip-shaped": {
        "embed_dim": 64,
        "init_logit_bias": -10.0,
        "custom_text": True,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_pool": "map", "timm_proj": "none", "image_size": 160},
        "text_cfg": {
            **TEXT,
            "no_causal_mask": True,
            "pool_type": "last",
            "proj_bias": True,
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
    },
    # timm's own classifier head as the projection (timm_proj null), as open_clip's EVA configs do
    "vit-head": {
        "embed_dim": 40,
        "custom_text": True,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_pool": "token", "timm_proj": None, "image_size": 160},
        "text_cfg": TEXT,
    },
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_timm_tower_configs(tmp_path, name):
    cfg = SMALL[name]
    ref = build(cfg)
    model = polymodal.from_pretrained(save_open_clip(ref, cfg, tmp_path / "oc")).eval()
    assert model.config.towers["image"].type == "timm"
    assert model.config.input_spec("image").image_size == (160, 160)
    eos = cfg["text_cfg"].get("eos_id") if cfg["text_cfg"].get("pool_type") == "eos" else None
    assert_parity(model, ref, 160, TEXT["vocab_size"], TEXT["context_length"], eos=eos)
    if name == "siglip-shaped":
        args = model.config.towers["text"].args
        assert (args["causal"], args["mask_padding"], args["pool_type"]) == (False, False, "final_position")
        assert model.alignment.logit_bias.item() == ref.logit_bias.item()


@pytest.mark.slow
@pytest.mark.parametrize("oc_name", ["convnext_tiny"])  # full-size SigLIP: benchmarks/import_parity.py
def test_default_timm_tower_configs(tmp_path, oc_name):
    """open_clip's own config at full size (random weights)."""
    torch.manual_seed(0)
    ref = perturbed(open_clip.create_model(oc_name, pretrained=None))
    cfg = open_clip.get_model_config(oc_name)
    model = polymodal.from_pretrained(save_open_clip(ref, cfg, tmp_path / "oc")).eval()
    text = cfg["text_cfg"]
    assert_parity(model, ref, 224, text.get("vocab_size", 49408), text.get("context_length", 77), pad=1)


def test_tokenizer_clean_matches_open_clip(tmp_path):
    """SigLIP's configs tokenize with clean='canonicalize' (lowercase, no punctuation): the ids equal open_clip's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["</s>", "<unk>", "a", "red", "circle", "photo", "of", "the", "cat's", "cats", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    cfg = {**SMALL["siglip-shaped"]}
    cfg["text_cfg"] = {
        **cfg["text_cfg"],
        "hf_tokenizer_name": "acme/tok",
        "tokenizer_kwargs": {"clean": "canonicalize"},
    }
    config = polymodal.convert.config_from_open_clip(cfg, tokenizer_dir=str(tmp_path / "tok"))
    assert config.tokenizer.clean == "canonicalize"
    ours = polymodal.get_tokenizer(config)
    theirs = open_clip.tokenizer.HFTokenizer(str(tmp_path / "tok"), context_length=16, clean="canonicalize")
    texts = ["A RED circle!", "a photo of the cat's dog.", "Cats_dog, a   photo"]
    assert torch.equal(ours(texts), theirs(texts))


@pytest.mark.parametrize(
    "vision, text, match",
    [
        (
            {"timm_model_name": "no_such_timm_net"},
            {},
            "'no_such_timm_net' is not an architecture of the installed timm",
        ),
        ({"timm_model_name": "test_convnext", "timm_pool": "abs_attn"}, {}, "timm_pool='abs_attn'"),
        ({"timm_model_name": "test_convnext", "timm_proj": "conv"}, {}, "timm_proj='conv'"),
        ({}, {"tokenizer_kwargs": {"strip_sep_token": True}}, r"tokenizer_kwargs \['strip_sep_token'\]"),
        ({}, {"tokenizer_kwargs": {"clean": "canonicalize"}}, "uses open_clip's own CLIP tokenizer"),
    ],
)
def test_refusals_name_the_field(vision, text, match):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 160, **vision}, "text_cfg": {**TEXT, **text}}
    with pytest.raises(CheckpointError, match=match):
        polymodal.convert.config_from_open_clip(cfg)


# ------------------------------------------------------------------------------ Hugging Face text towers


def tiny_roberta(directory, **overrides):
    from transformers import RobertaConfig

    RobertaConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        **overrides,
    ).save_pretrained(directory)
    return str(directory)


def hf_text_cfg(name: str, **text) -> dict:
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    return {
        "embed_dim": 24,
        "custom_text": True,
        "vision_cfg": vision,
        "text_cfg": {"hf_model_name": name, "hf_tokenizer_name": name, "hf_model_pretrained": False, **text},
    }


@pytest.mark.parametrize(
    "text",
    [
        {"hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"},
        {"hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear"},
    ],
)
def test_small_hf_text_tower(tmp_path, text):
    cfg = hf_text_cfg(tiny_roberta(tmp_path / "roberta"), context_length=20, **text)
    ref = build(cfg)
    model = polymodal.from_pretrained(save_open_clip(ref, cfg, tmp_path / "oc")).eval()
    assert model.config.towers["text"].type == "hf_text"
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (3, 20), generator=g)
    ids[:, 0], ids[0, 6:], ids[1, 12:] = 0, 1, 1  # <s> first; roberta pads with 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)
        images = torch.randn(2, 3, 32, 32, generator=g)
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)


def test_hf_text_architecture_from_the_hub_cache(tmp_path, monkeypatch):
    """A hub id as hf_model_name is read from the local cache; a miss names hf_model_name and the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    tiny_roberta(tmp_path / "roberta")
    cache_repo(cache, "acme/tiny-roberta", tmp_path / "roberta")
    config = polymodal.convert.config_from_open_clip(hf_text_cfg("acme/tiny-roberta", hf_proj_type="linear"))
    args = config.towers["text"].args
    assert args["config"]["hidden_size"] == 32 and args["config"]["model_type"] == "roberta"
    with pytest.raises(CheckpointError, match=r"hf_model_name='acme/absent'.*models--acme--absent"):
        polymodal.convert.config_from_open_clip(hf_text_cfg("acme/absent"))


def test_hf_text_refusals(tmp_path):
    from transformers import T5Config

    roberta = tiny_roberta(tmp_path / "roberta")
    with pytest.raises(CheckpointError, match="hf_pooler_type='cls_pooler'"):
        polymodal.convert.config_from_open_clip(hf_text_cfg(roberta, hf_pooler_type="cls_pooler"))
    with pytest.raises(CheckpointError, match="hf_proj_type=None keeps the width 32"):
        polymodal.convert.config_from_open_clip(hf_text_cfg(roberta, hf_proj_type=None))
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=50).save_pretrained(tmp_path / "t5")
    with pytest.raises(CheckpointError, match="encoder-decoder"):
        polymodal.convert.config_from_open_clip(hf_text_cfg(str(tmp_path / "t5")))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(CheckpointError, match="model_type 'no-such-arch'"):
        polymodal.convert.config_from_open_clip(hf_text_cfg(str(tmp_path / "odd")))


@pytest.mark.slow
def test_default_hf_text_config(tmp_path):
    """open_clip's roberta-ViT-B-32 at full size, with roberta-base's architecture (transformers' defaults)."""
    from transformers import RobertaConfig

    RobertaConfig().save_pretrained(tmp_path / "roberta-base")
    cfg = open_clip.get_model_config("roberta-ViT-B-32")
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": str(tmp_path / "roberta-base"), "hf_model_pretrained": False}
    cfg["custom_text"] = True
    ref = build(cfg)
    model = polymodal.from_pretrained(save_open_clip(ref, cfg, tmp_path / "oc")).eval()
    ids = torch.randint(3, 50265, (2, 77), generator=torch.Generator().manual_seed(4))
    ids[:, 0], ids[0, 9:] = 0, 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)
