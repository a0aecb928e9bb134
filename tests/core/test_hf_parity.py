"""Hugging Face CLIP directories (random weights, built here) import with identical outputs, and export back."""

import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

import polymodal
from polymodal import create_model, export_model, from_pretrained
from tests.core.test_open_clip_parity import perturbed


def small_hf_config(text_act="gelu", vision_act="quick_gelu", eos=999) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=48,
            intermediate_size=100,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=20,
            hidden_act=text_act,
            layer_norm_eps=1e-6,
            eos_token_id=eos,
            pad_token_id=0,
            bos_token_id=998,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=120,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=48,
            patch_size=8,
            hidden_act=vision_act,
            layer_norm_eps=1e-6,
        ),
        projection_dim=40,
        logit_scale_init_value=2.5,
    )


def features(out):
    # transformers >= 5 returns a model output with the projected features in pooler_output
    return out.pooler_output if hasattr(out, "pooler_output") else out


def text_ids(eos: int) -> torch.Tensor:
    ids = torch.zeros(3, 20, dtype=torch.long)
    for i, n in enumerate((4, 9, 19)):
        ids[i, 0] = 998
        ids[i, 1:n] = torch.randint(1, 990, (n - 1,))
        ids[i, n] = eos
    return ids


@pytest.mark.parametrize("eos", [999, 2])  # 2: configs written before HF fixed eos_token_id pool at argmax
def test_hf_directory_parity(tmp_path, eos):
    torch.manual_seed(0)
    ref = perturbed(CLIPModel(small_hf_config(eos=eos)))
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf").eval()
    assert model.config.towers["text"].args["act_layer"] == "gelu"
    assert model.config.towers["image"].args["act_layer"] == "quick_gelu"
    pixels = torch.randn(2, 3, 48, 48)
    ids = text_ids(999)
    if eos == 2:
        ids[ids == 999] = 997  # argmax pooling needs end-of-text to be the highest id
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels),
            features(ref.get_image_features(pixel_values=pixels)),
            rtol=0,
            atol=1e-5,
        )
        torch.testing.assert_close(
            model.encode_text(ids), features(ref.get_text_features(input_ids=ids)), rtol=0, atol=1e-5
        )
        out = ref(input_ids=ids, pixel_values=pixels)
        ours = model(image=pixels, text=ids)
        logits = ours.logit_scale * ours.embeddings["text"] @ ours.embeddings["image"].t()
        torch.testing.assert_close(logits, out.logits_per_text, rtol=0, atol=1e-4)


def test_hf_state_dict_file_into_registered_shape(tmp_path):
    cfg = small_hf_config()
    ref = perturbed(CLIPModel(cfg))
    ref.save_pretrained(tmp_path / "hf")
    # create_model with a config built from the HF one and a bare weights file
    from polymodal.convert import config_from_hf

    model = create_model(config_from_hf(cfg.to_dict()), pretrained=tmp_path / "hf" / "model.safetensors").eval()
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels),
            features(ref.get_image_features(pixel_values=pixels)),
            rtol=0,
            atol=1e-5,
        )


def test_round_trip_polymodal_hf_polymodal(tmp_path):
    model = perturbed(create_model("clip-vit-tiny"))
    export_model(model, tmp_path / "hf", to="hf")
    ref = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 48, 48)
    ids = polymodal.get_tokenizer(model)(["a red circle", "two blue squares and a green triangle"])
    with torch.no_grad():
        torch.testing.assert_close(
            features(ref.get_image_features(pixel_values=pixels)),
            model.encode_image(pixels),
            rtol=0,
            atol=1e-5,
        )
        torch.testing.assert_close(
            features(ref.get_text_features(input_ids=ids)), model.encode_text(ids), rtol=0, atol=1e-5
        )
    again = from_pretrained(tmp_path / "hf")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert again.config.preprocess.mean == pytest.approx(list(model.config.preprocess.mean))


def test_models_hf_cannot_express_are_refused(tmp_path):
    from polymodal import CheckpointError

    with pytest.raises(CheckpointError, match="image-text"):
        export_model(create_model("clap-cnn-tiny"), tmp_path / "x", to="hf")
    with pytest.raises(CheckpointError, match="logit bias"):
        export_model(create_model("clip-vit-tiny", init_logit_bias=-10.0), tmp_path / "y", to="hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_hf_mapped_field_values_have_parity(tmp_path):
    """Non-default values of the mapped fields: tanh-GELU variants, one input channel, attention dropout."""
    cfg = small_hf_config(text_act="gelu_new", vision_act="gelu_pytorch_tanh")
    cfg.vision_config.num_channels = 1
    cfg.text_config.attention_dropout = cfg.vision_config.attention_dropout = 0.1
    torch.manual_seed(0)
    ref = perturbed(CLIPModel(cfg))
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf").eval()
    image, text = model.config.towers["image"].args, model.config.towers["text"].args
    assert (image["act_layer"], text["act_layer"]) == ("gelu_tanh", "gelu_tanh")
    assert (image["in_chans"], image["attn_drop"], text["attn_drop"]) == (1, 0.1, 0.1)
    pixels, ids = torch.randn(2, 1, 48, 48), text_ids(999)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels), features(ref.get_image_features(pixel_values=pixels)), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            model.encode_text(ids), features(ref.get_text_features(input_ids=ids)), rtol=0, atol=1e-5
        )
    # exported back, transformers reads the same field values
    export_model(model, tmp_path / "back", to="hf")
    back = CLIPConfig.from_pretrained(tmp_path / "back")
    assert (back.vision_config.num_channels, back.text_config.attention_dropout) == (1, 0.1)
    assert back.text_config.hidden_act == "gelu_pytorch_tanh"


CAPTIONS = ["a red circle", "Two blue squares and a green triangle!", "a photo of " * 20]  # the last overflows


def test_clip_export_writes_the_builtin_tokenizer_as_clip_tokenizer_files(tmp_path):
    from transformers import CLIPProcessor, CLIPTokenizer, CLIPTokenizerFast

    model = perturbed(create_model("clip-vit-tiny"))
    export_model(model, tmp_path / "hf", to="hf")
    assert (tmp_path / "hf" / "vocab.json").is_file() and (tmp_path / "hf" / "merges.txt").is_file()
    tokenizer = polymodal.get_tokenizer(model)
    ours = tokenizer(CAPTIONS)
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        theirs = cls.from_pretrained(tmp_path / "hf")(CAPTIONS, padding="max_length", truncation=True)["input_ids"]
        theirs = torch.tensor(theirs)
        assert theirs.shape == ours.shape == (3, 32)
        # the same ids up to end-of-text; transformers then pads with end-of-text, polymodal with 0
        ends = (ours == tokenizer.eot_token_id).int().argmax(-1)
        for row, end in enumerate(ends.tolist()):
            assert theirs[row, : end + 1].tolist() == ours[row, : end + 1].tolist()
            assert theirs[row, end + 1 :].eq(tokenizer.eot_token_id).all()
    processor = CLIPProcessor.from_pretrained(tmp_path / "hf")
    ids = processor(text=CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    ref = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():  # either padding gives the same embedding: the causal tower pools at end-of-text
        torch.testing.assert_close(
            features(ref.get_text_features(input_ids=ids)), model.encode_text(ours), rtol=0, atol=1e-5
        )

    # imported back, the directory's tokenizer files are an "hf" tokenizer, which exports as itself
    again = from_pretrained(tmp_path / "hf")
    assert again.config.tokenizer.type == "hf"
    export_model(again, tmp_path / "hf2", to="hf")
    expected = polymodal.get_tokenizer(again)(CAPTIONS)
    saved = AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert saved.model_max_length == 32
    assert torch.equal(
        saved(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"], expected
    )
