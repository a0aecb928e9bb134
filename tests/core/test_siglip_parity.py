"""Hugging Face SigLIP and Siglip2 directories (random weights, built here) import with identical outputs,
their tokenizer pads as SigLIP needs, unsupported fields are refused by name, and models export back."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

import polymodal
from polymodal import CheckpointError, create_model, export_model, from_pretrained
from polymodal.convert import config_from_hf, hf_to_polymodal
from polymodal.convert_siglip import siglip_preprocess
from tests.core.test_open_clip_parity import perturbed

PAD = EOS = 1  # SigLIP's tokenizer pads with its end-of-text token
LOGIT_SCALE, LOGIT_BIAS = 4.9, -11.3  # above polymodal's default clamp (ln 100 = 4.61), as trained SigLIPs are

SMALL_TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=24,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    pad_token_id=PAD,
    eos_token_id=EOS,
    projection_size=48,
)
SMALL_VISION = dict(
    hidden_size=48,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=6,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def small_config(**text) -> SiglipConfig:
    return SiglipConfig(text_config={**SMALL_TEXT, **text}, vision_config=SMALL_VISION)


def default_width_config() -> SiglipConfig:
    """SigLIP-Base's widths, heads, vocabulary, context, image and patch size, with 2 layers a tower."""
    return SiglipConfig(text_config={"num_hidden_layers": 2}, vision_config={"num_hidden_layers": 2})


def reference(model: torch.nn.Module) -> torch.nn.Module:
    perturbed(model)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
        model.logit_bias.fill_(LOGIT_BIAS)
    return model


def text_ids(vocab: int, length: int, rows=(3, 9, None)) -> torch.Tensor:
    """Random words, then end-of-text and padding (both ``EOS``); ``None``: a row of words filling the context."""
    g = torch.Generator().manual_seed(5)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, n in enumerate(rows):
        n = length if n is None else n
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
    return ids


def our_logits(model, pixels, ids) -> torch.Tensor:
    out = model(image=pixels, text=ids)
    return out.logit_scale * out.embeddings["image"] @ out.embeddings["text"].t() + out.logit_bias


def assert_parity(model, ref, pixels, ids, hf_image_inputs=None) -> dict[str, float]:
    """Image and text embeddings and logits_per_image equal; returns the max abs differences."""
    with torch.no_grad():
        out = ref(input_ids=ids, **(hf_image_inputs or {"pixel_values": pixels}))
        pairs = {  # the towers' outputs before normalisation, and the sigmoid logits
            "image": (model.encode_image(pixels), out.vision_model_output.pooler_output),
            "text": (model.encode_text(ids), out.text_model_output.pooler_output),
            "logits": (our_logits(model, pixels, ids), out.logits_per_image),
        }
    for name, (ours, theirs) in pairs.items():
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 if name == "logits" else 1e-5, msg=name)
    return {name: (a - b).abs().max().item() for name, (a, b) in pairs.items()}


# ------------------------------------------------------------------------------------------- parity


def test_small_non_default_siglip_directory_parity(tmp_path):
    """Other widths per tower, 6 heads, a text projection, GELU / QuickGELU, eps 1e-5, logit scale above ln 100."""
    torch.manual_seed(0)
    ref = reference(SiglipModel(small_config())).eval()
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf").eval()
    image, text = model.config.towers["image"].args, model.config.towers["text"].args
    assert (image["act_layer"], text["act_layer"], image["norm_eps"]) == ("quick_gelu", "gelu", 1e-5)
    assert (image["pool_type"], text["pool_type"], text["mask_padding"]) == ("map", "final_position", False)
    assert model.config.embed_dim == 48 and model.config.max_logit_scale == 88.0
    pixels = torch.randn(2, 3, 32, 32)
    assert_parity(model, ref, pixels, text_ids(100, 24))
    assert model.alignment.logit_scale.item() == pytest.approx(LOGIT_SCALE)
    assert model.alignment.logit_bias.item() == pytest.approx(LOGIT_BIAS)
    # create_model reads the directory the same way, and a polymodal save keeps the unclamped scale
    built = create_model(str(tmp_path / "hf"))
    built.save_pretrained(tmp_path / "saved")
    again = from_pretrained(tmp_path / "saved")
    assert again.config.max_logit_scale == 88.0
    strict = json.loads((tmp_path / "saved" / "config.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["max_logit_scale"] == 88.0  # valid JSON: no Infinity or NaN
    for key, value in model.state_dict().items():
        assert torch.equal(value, built.state_dict()[key]) and torch.equal(value, again.state_dict()[key]), key


def test_default_width_siglip_parity():
    """SigLIP-Base's shape (768 wide, 12 heads, 224 px at patch 16, 64 tokens of a 32000 vocabulary), 2 layers."""
    torch.manual_seed(0)
    ref = reference(SiglipModel(default_width_config())).eval()
    config = config_from_hf(ref.config.to_dict())
    model = create_model(config)
    model.load_state_dict(hf_to_polymodal(ref.state_dict()))
    model.eval()
    assert_parity(model, ref, torch.randn(2, 3, 224, 224), text_ids(32000, 64, rows=(5, 20)))


def test_padding_is_attended_and_the_final_position_pooled():
    """SigLIP's text tower differs from CLIP's: moving the end-of-text token or changing padding changes the output."""
    torch.manual_seed(0)
    ref = reference(SiglipModel(small_config())).eval()
    model = create_model(config_from_hf(ref.config.to_dict()))
    model.load_state_dict(hf_to_polymodal(ref.state_dict()))
    ids = text_ids(100, 24, rows=(3,))
    other = ids.clone()
    other[0, 10] = 7  # a word inside the padding
    with torch.no_grad():
        assert (model.encode_text(ids) - model.encode_text(other)).abs().max() > 1e-3
        torch.testing.assert_close(
            model.encode_text(other), ref.get_text_features(input_ids=other).pooler_output, rtol=0, atol=1e-5
        )


def siglip2_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    return torch.stack([convert_image_to_patches(image, patch) for image in pixels])  # (B, N, p*p*C)


def test_siglip2_at_its_native_grid(tmp_path):
    """Siglip2's Linear patch embedding and resized position table equal SigLIP's ViT at the table's grid."""
    vision = {k: v for k, v in SMALL_VISION.items() if k != "image_size"}
    cfg = Siglip2Config(text_config=SMALL_TEXT, vision_config={**vision, "num_patches": 16})  # 4 x 4 patches
    torch.manual_seed(0)
    ref = reference(Siglip2Model(cfg)).eval()
    ref.save_pretrained(tmp_path / "hf2")
    model = from_pretrained(tmp_path / "hf2").eval()
    assert model.config.towers["image"].args["image_size"] == 32
    assert model.config.preprocess.interpolation == "bilinear"
    pixels = torch.randn(2, 3, 32, 32)
    inputs = {
        "pixel_values": siglip2_patches(pixels, 8),
        "pixel_attention_mask": torch.ones(2, 16, dtype=torch.long),
        "spatial_shapes": torch.tensor([[4, 4], [4, 4]]),
    }
    assert_parity(model, ref, pixels, text_ids(100, 24), inputs)
    # the same weights given the model's config: channels and patch size read from it, not inferred
    state = hf_to_polymodal(ref.state_dict(), model.config)
    torch.testing.assert_close(state["towers.image.patch_embed.weight"], model.towers["image"].patch_embed.weight)


def test_default_width_siglip2_at_its_native_grid(tmp_path):
    """Siglip2's default shape (768 wide, 12 heads, patch 16, 256 patches: 256 pixels, 64 tokens of a 256000
    vocabulary) with 2 layers a tower; the full-depth model is in benchmarks/import_parity.py."""
    cfg = Siglip2Config(text_config={"num_hidden_layers": 2}, vision_config={"num_hidden_layers": 2})
    torch.manual_seed(0)
    ref = reference(Siglip2Model(cfg)).eval()
    ref.save_pretrained(tmp_path / "hf2")
    model = from_pretrained(tmp_path / "hf2").eval()
    assert model.config.towers["image"].args["image_size"] == 256
    pixels = torch.randn(2, 3, 256, 256)
    inputs = {
        "pixel_values": siglip2_patches(pixels, 16),
        "pixel_attention_mask": torch.ones(2, 256, dtype=torch.long),
        "spatial_shapes": torch.tensor([[16, 16], [16, 16]]),
    }
    assert_parity(model, ref, pixels, text_ids(cfg.text_config.vocab_size, 64), inputs)


# ---------------------------------------------------------------------------------------- tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "two", "red", "blue", "the", "on", "sofa"]


def save_siglip_tokenizer(directory) -> PreTrainedTokenizerFast:
    """A SigLIP-like tokenizer built locally: words, then end-of-text, padded with end-of-text."""
    vocab = {"<pad>": 0, "</s>": EOS, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="</s>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


CAPTIONS = ["a photo of a cat", "two red dogs on the blue sofa", "the cat " * 40]  # the last overflows 64


def test_tokenizer_pads_to_the_context_as_siglip_needs(tmp_path):
    torch.manual_seed(0)
    ref = reference(SiglipModel(small_config(max_position_embeddings=64))).eval()
    ref.save_pretrained(tmp_path / "hf")
    hf_tokenizer = save_siglip_tokenizer(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf").eval()
    assert (model.config.tokenizer.type, model.config.input_spec("text").context_length) == ("hf", 64)
    ids = polymodal.get_tokenizer(model)(CAPTIONS)
    expected = hf_tokenizer(CAPTIONS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert ids.shape == (3, 64) and ids[0, 5:].eq(EOS).all() and ids[2, -1] == EOS
    with torch.no_grad():  # no attention mask: SigLIP reads the padded ids as they are
        torch.testing.assert_close(
            model.encode_text(ids), ref.get_text_features(input_ids=ids).pooler_output, rtol=0, atol=1e-5
        )


def test_directory_without_tokenizer_says_so(tmp_path):
    SiglipModel(small_config()).save_pretrained(tmp_path / "hf")
    reference_ = polymodal.parse_reference(tmp_path / "hf")
    assert reference_.kind == "hf" and reference_.config.tokenizer is None
    with pytest.raises(polymodal.InputError, match="has a text tower but no tokenizer config"):
        polymodal.get_tokenizer(reference_.config)


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "tower, change, message",
    [
        ("vision_config", {"vision_use_head": False}, r"vision_config\.vision_use_head=False"),
        ("text_config", {"hidden_act": "relu"}, r"text_config\.hidden_act='relu'"),
        ("text_config", {"projection_size": 40}, r"text_config\.projection_size 40 differs"),
        ("vision_config", {"image_size": [32, 48]}, r"vision_config\.image_size=\[32, 48\]"),
        ("vision_config", {"rope_theta": 10.0}, r"vision_config has fields \['rope_theta'\]"),
        ("vision_config", {"model_type": "clip_vision_model"}, r"vision_config\.model_type is 'clip_vision_model'"),
    ],
)
def test_unsupported_siglip_fields_are_refused_by_name(tower, change, message):
    hf = small_config().to_dict()
    hf[tower].update(change)
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf)


def test_unsupported_siglip2_fields_are_refused_by_name():
    hf = Siglip2Config(vision_config={"num_patches": 20}).to_dict()
    with pytest.raises(CheckpointError, match=r"vision_config\.num_patches=20 is not supported"):
        config_from_hf(hf)
    with pytest.raises(CheckpointError, match=r"model_type one of \('clip', 'siglip', 'siglip2'\), got 'bert'"):
        config_from_hf({"model_type": "bert"})


def test_siglip_preprocess_defaults_are_transformers():
    for model_type, processor in (("siglip", SiglipImageProcessor()), ("siglip2", Siglip2ImageProcessor())):
        pre = siglip_preprocess(model_type)
        assert (tuple(pre.mean), tuple(pre.std)) == (tuple(processor.image_mean), tuple(processor.image_std))
        assert pre.interpolation == {2: "bilinear", 3: "bicubic"}[int(processor.resample)]
    assert SiglipImageProcessor().size == {"height": 224, "width": 224}  # a squash, no crop


# -------------------------------------------------------------------------------------------- export


def test_round_trip_polymodal_hf_polymodal(tmp_path):
    torch.manual_seed(0)
    source = reference(SiglipModel(small_config(max_position_embeddings=64))).eval()
    source.save_pretrained(tmp_path / "hf")
    save_siglip_tokenizer(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():  # move the weights off the source's, so the export is what is compared
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    export_model(model, tmp_path / "out", to="hf")

    hf = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "SiglipModel"
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_processor.size == {"height": 32, "width": 32}
    assert list(SiglipImageProcessor.from_pretrained(tmp_path / "out").image_mean) == [0.5, 0.5, 0.5]
    ids = processor(text=CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, polymodal.get_tokenizer(model)(CAPTIONS))
    assert_parity(model, hf, torch.randn(2, 3, 32, 32), ids)

    again = from_pretrained(tmp_path / "out")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert again.config.towers == model.config.towers
    assert again.config.input_spec("image") == model.config.input_spec("image")


def test_export_refuses_what_siglip_cannot_express(tmp_path):
    torch.manual_seed(0)
    config = config_from_hf(small_config().to_dict())
    cases = [
        ({"text": {"causal": True}}, r"text tower has causal=True, but Hugging Face SigLIP's has causal=False"),
        ({"init_logit_bias": None}, "has a logit bias; this model has none"),
        ({"image": {"ls_init_value": 0.1}}, r"image tower sets ls_init_value=0.1, which Hugging Face SigLIP"),
        ({"embed_dim": 40}, "expected embed_dim and the text tower's output_dim 48, got 40"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            export_model(create_model(config, **overrides), tmp_path / str(i), to="hf")
        assert not (tmp_path / str(i)).exists()
