"""Every foreign config field is mapped (with parity), ignored for a stated reason, or refused by name."""

import dataclasses
import inspect
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.coca_model import MultimodalCfg
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    Siglip2Config,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from polymodal import export_model, from_pretrained
from polymodal.checkpoint import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, CheckpointError
from polymodal.convert import config_from_hf, config_from_open_clip
from polymodal.convert_fields import (
    HF_MODEL_FIELDS,
    HF_TEXT_FIELDS,
    HF_VISION_FIELDS,
    IGNORE,
    MAP,
    OPEN_CLIP_MODEL_FIELDS,
    OPEN_CLIP_MULTIMODAL_FIELDS,
    OPEN_CLIP_PREPROCESS_FIELDS,
    OPEN_CLIP_TEXT_FIELDS,
    OPEN_CLIP_VISION_FIELDS,
    REFUSE,
    SIGLIP2_VISION_FIELDS,
    SIGLIP_MODEL_FIELDS,
    SIGLIP_TEXT_FIELDS,
    SIGLIP_VISION_FIELDS,
)
from tests.core.test_open_clip_parity import perturbed

# ------------------------------------------------------------------------------------- the tables


@pytest.mark.parametrize(
    "cls, table",
    [
        (CLIPVisionCfg, OPEN_CLIP_VISION_FIELDS),
        (CLIPTextCfg, OPEN_CLIP_TEXT_FIELDS),
        (PreprocessCfg, OPEN_CLIP_PREPROCESS_FIELDS),
        (MultimodalCfg, OPEN_CLIP_MULTIMODAL_FIELDS),
    ],
)
def test_open_clip_tables_list_every_dataclass_field_with_its_default(cls, table):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == set(table), "a field open_clip has is missing from the table (or one it lacks is in it)"
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert table[name].default == default, name
        assert table[name].action in (MAP, IGNORE, REFUSE) and table[name].note, name


def test_open_clip_model_table_lists_every_clip_argument():
    params = inspect.signature(open_clip.model.CLIP.__init__).parameters
    for name, p in params.items():
        if name == "self":
            continue
        assert name in OPEN_CLIP_MODEL_FIELDS, name
        ours = OPEN_CLIP_MODEL_FIELDS[name].default
        if p.default is None or isinstance(p.default, bool):
            assert ours is p.default, name
        elif p.default is not inspect.Parameter.empty:
            assert ours == pytest.approx(p.default), name
    # and the factory's own model switches
    assert {"custom_text", "multimodal_cfg"} <= set(OPEN_CLIP_MODEL_FIELDS)


@pytest.mark.parametrize(
    "cls, table",
    [(CLIPTextConfig, HF_TEXT_FIELDS), (CLIPVisionConfig, HF_VISION_FIELDS), (CLIPConfig, HF_MODEL_FIELDS)],
)
def test_hf_tables_list_every_config_field(cls, table):
    fields = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    assert fields <= set(table), sorted(fields - set(table))
    defaults = cls().to_dict()
    for name, field in table.items():
        if field.action != IGNORE and name in defaults and name not in ("model_type", "text_config", "vision_config"):
            assert field.default == defaults[name], name


@pytest.mark.parametrize(
    "cls, table",
    [
        (SiglipTextConfig, SIGLIP_TEXT_FIELDS),
        (SiglipVisionConfig, SIGLIP_VISION_FIELDS),
        (SiglipConfig, SIGLIP_MODEL_FIELDS),
        (Siglip2TextConfig, SIGLIP_TEXT_FIELDS),
        (Siglip2VisionConfig, SIGLIP2_VISION_FIELDS),
        (Siglip2Config, SIGLIP_MODEL_FIELDS),
    ],
)
def test_siglip_tables_list_every_config_field(cls, table):
    params = inspect.signature(cls.__init__).parameters
    fields = set(cls().to_dict()) | set(params) - {"self", "kwargs"}
    assert fields <= set(table), sorted(fields - set(table))
    for name, field in table.items():
        # the constructor's defaults: to_dict() shows projection_size already derived from hidden_size
        if field.action != IGNORE and name in params and name not in ("model_type", "text_config", "vision_config"):
            assert field.default == params[name].default, name
        assert field.action in (MAP, IGNORE, REFUSE) and field.note, name


def test_every_bundled_open_clip_config_converts_or_names_the_field_it_refuses():
    configs = sorted((Path(open_clip.__file__).parent / "model_configs").glob("*.json"))
    assert len(configs) > 100
    converted = 0
    for path in configs:
        try:
            config_from_open_clip(json.loads(path.read_text()), name=path.stem)
            converted += 1
        except CheckpointError as err:
            assert any(part in str(err) for part in ("vision_cfg.", "text_cfg.", "model_cfg.")), (path.name, err)
    assert converted >= 40, converted


def test_metaclip2_worldwide_keeps_eos_pooling_and_its_hf_tokenizer():
    path = Path(open_clip.__file__).parent / "model_configs" / "ViT-H-14-worldwide.json"
    config = config_from_open_clip(json.loads(path.read_text()))
    text = config.towers["text"].args
    assert (text["pool_type"], text["eos_token_id"]) == ("eos", 2)
    assert (config.tokenizer.type, config.tokenizer.path) == ("hf", "facebook/xlm-v-base")


def test_hf_tokenizer_dir_is_used_when_given(tmp_path):
    cfg = {"embed_dim": 64, "text_cfg": {"hf_tokenizer_name": "org/tok", "pool_type": "eos", "eos_id": 2}}
    config = config_from_open_clip(cfg, tokenizer_dir=str(tmp_path))
    assert config.tokenizer.path == str(tmp_path.resolve())
    with pytest.raises(CheckpointError, match="not a directory"):
        config_from_open_clip(cfg, tokenizer_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"embed_dim": 64, "text_cfg": {"scale_fc": True}}, r"text_cfg\.scale_fc=True"),
        ({"embed_dim": 64, "text_cfg": {"pool_type": "max"}}, r"text_cfg\.pool_type='max'"),
        ({"embed_dim": 64, "vision_cfg": {"qk_norm": True}}, r"vision_cfg\.qk_norm=True"),
        ({"embed_dim": 64, "vision_cfg": {"pool_type": "avg", "final_ln_after_pool": True}}, "final_ln_after_pool"),
        ({"embed_dim": 64, "vision_cfg": {"norm_kwargs": {"eps": 1e-6, "bias": False}}}, r"vision_cfg\.norm_kwargs"),
        ({"embed_dim": 64, "text_cfg": {"act_kwargs": {"approximate": "tanh"}}, "quick_gelu": True}, "act_kwargs"),
        ({"embed_dim": 64, "nonscalar_logit_scale": True}, r"model_cfg\.nonscalar_logit_scale=True"),
        ({"embed_dim": 64, "vision_cfg": {"brand_new_field": 1}}, r"vision_cfg has fields \['brand_new_field'\]"),
        ({"embed_dim": 64, "brand_new_switch": True}, "brand_new_switch"),
        ({"vision_cfg": {}}, "embed_dim"),
    ],
)
def test_open_clip_fields_that_would_change_outputs_are_refused_by_name(cfg, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_open_clip(cfg)


def test_hf_fields_that_would_change_outputs_are_refused_by_name():
    hf = CLIPConfig().to_dict()
    hf["text_config"]["pruned_heads"] = {"0": [1]}
    with pytest.raises(CheckpointError, match=r"text_config\.pruned_heads"):
        config_from_hf(hf)
    hf = CLIPConfig().to_dict()
    hf["vision_config"]["use_rotary_positions"] = True
    with pytest.raises(CheckpointError, match=r"vision_config has fields \['use_rotary_positions'\]"):
        config_from_hf(hf)
    hf = CLIPConfig().to_dict()
    hf["text_config"]["hidden_act"] = "silu"
    with pytest.raises(CheckpointError, match=r"text_config\.hidden_act='silu'"):
        config_from_hf(hf)


def test_legacy_hf_config_dicts_override_the_tower_configs():
    hf = CLIPConfig().to_dict()
    hf["text_config_dict"] = {"hidden_size": 256, "max_length": 20, "torchscript": False}
    config = config_from_hf(hf)
    assert config.towers["text"].args["width"] == 256


# ------------------------------------------------------------------------------------------ parity

VISION = {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}
TEXT = {"context_length": 16, "vocab_size": 100, "width": 48, "heads": 4, "layers": 2}

VARIANTS = {
    # MetaCLIP-2 style: pool at a tokenizer-specific end-of-text id that is not the highest id
    "eos_pool": {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 1}},
    "tower_options": {
        "embed_dim": 32,
        "vision_cfg": {
            **VISION,
            "pool_type": "avg",
            "no_ln_pre": True,
            "ls_init_value": 0.5,
            "mlp_ratio": 3.0,
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
        "text_cfg": {
            **TEXT,
            "proj_bias": True,
            "ls_init_value": 0.5,
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
    },
    "quick_gelu_first_pool_bias": {
        "embed_dim": 32,
        "quick_gelu": True,
        "init_logit_bias": -10.0,
        "init_logit_scale": 2.0,
        "vision_cfg": {**VISION, "final_ln_after_pool": True},
        "text_cfg": {**TEXT, "pool_type": "first", "mlp_ratio": 2.5},
    },
}


def text_ids(eos: int) -> torch.Tensor:
    """Rows of random ids, then ``eos``, then padding 0. With ``eos`` 99 (the highest id) argmax pooling
    finds it; with ``eos`` 1 the highest id is some other token, so only eos pooling finds it."""
    g = torch.Generator().manual_seed(3)
    low, high = (2, 100) if eos == 1 else (1, 99)
    ids = torch.zeros(4, 16, dtype=torch.long)
    for row, n in enumerate((3, 7, 12, 15)):
        ids[row, :n] = torch.randint(low, high, (n,), generator=g)
        ids[row, n] = eos
    return ids


def write_open_clip_dir(ref: torch.nn.Module, cfg: dict, directory: Path) -> None:
    directory.mkdir()
    (directory / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(directory / OPEN_CLIP_WEIGHTS))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_open_clip_field_values_import_and_export_with_parity(tmp_path, variant):
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    ref = perturbed(open_clip.model.CLIP(**cfg))
    write_open_clip_dir(ref, cfg, tmp_path / "oc")
    model = from_pretrained(tmp_path / "oc").eval()
    images = torch.randn(2, 3, 32, 32)
    ids = text_ids(eos=1 if variant == "eos_pool" else 99)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)
    assert model.alignment.logit_scale.item() == pytest.approx(ref.logit_scale.item())
    if ref.logit_bias is not None:
        assert model.alignment.logit_bias.item() == pytest.approx(ref.logit_bias.item())

    # and back out: open_clip builds the exported config and agrees
    export_model(model, tmp_path / "back", to="open_clip")
    again = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(again.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-5)


def test_eos_pooling_differs_from_argmax_on_these_inputs(tmp_path):
    """The eos parity above is meaningful: pooling at the highest id would give other embeddings."""
    cfg = VARIANTS["eos_pool"]
    torch.manual_seed(0)
    ref = perturbed(open_clip.model.CLIP(**cfg))
    write_open_clip_dir(ref, cfg, tmp_path / "oc")
    model = from_pretrained(tmp_path / "oc").eval()
    model.towers["text"].pool_type = "argmax"
    ids = text_ids(eos=1)
    with torch.no_grad():
        assert (model.encode_text(ids) - ref.encode_text(ids)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "tower, args, message, formats",
    [
        ("image", {"patch_bias": True}, r"image tower sets patch_bias=True, which {} configs", ("open_clip", "hf")),
        ("image", {"in_chans": 1}, r"in_chans=1", ("open_clip",)),  # HF CLIP has num_channels
        ("text", {"causal": False}, r"text tower sets causal=False", ("open_clip", "hf")),
        ("text", {"norm_layer": "rmsnorm"}, r"norm_layer='rmsnorm'", ("open_clip", "hf")),
    ],
)
def test_export_refuses_arguments_the_format_cannot_express(tower, args, message, formats):
    from polymodal import get_model_config
    from polymodal.convert import hf_config_from, open_clip_model_cfg

    config = get_model_config("clip-vit-tiny")
    config.towers[tower].args.update(args)
    exporters = {"open_clip": (open_clip_model_cfg, "open_clip"), "hf": (hf_config_from, "Hugging Face CLIP")}
    for fmt in formats:
        exporter, name = exporters[fmt]
        with pytest.raises(CheckpointError, match=message.format(name)):
            exporter(config)


def test_export_reads_constructor_defaults_for_arguments_a_config_leaves_out():
    from polymodal import get_model_config
    from polymodal.config import ENCODER_TYPES
    from polymodal.convert import open_clip_model_cfg

    config = get_model_config("clip-vit-tiny")
    del config.towers["image"].args["patch_size"]
    default = inspect.signature(ENCODER_TYPES["vit"]).parameters["patch_size"].default
    assert open_clip_model_cfg(config)["vision_cfg"]["patch_size"] == default


def test_open_clip_preprocess_and_training_fields_are_mapped():
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "patch_size": 8, "patch_dropout": 0.5}}
    pre = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    config = config_from_open_clip(cfg, preprocess={**pre, "resize_mode": "squash"})
    assert config.towers["image"].args["patch_dropout"] == 0.5
    p = config.preprocess
    assert (p.mean, p.std, p.interpolation, p.resize_mode) == ([0.5] * 3, [0.25] * 3, "bilinear", "squash")
    assert config.input_spec("image").image_size == (32, 32)
    with pytest.raises(CheckpointError, match=r"preprocess_cfg\.size 64 differs from vision_cfg\.image_size 32"):
        config_from_open_clip(cfg, preprocess={"size": 64})
    with pytest.raises(CheckpointError, match=r"preprocess_cfg\.fill_color=255"):
        config_from_open_clip(cfg, preprocess={"fill_color": 255})
