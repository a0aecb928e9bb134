"""Every registered model: builds, runs forward and backward, every parameter learns, checkpointing is exact."""

import json

import pytest
import torch

import polymodal
from polymodal import ContrastiveModel, ContrastiveOutput, create_model, list_models
from polymodal.config import DECODER_TYPES, DEFAULT_CLIP_SECONDS, decoder_types
from polymodal.fusion import clip_loss
from polymodal.tasks.captioning import CaptionOutput, caption_loss
from tests.helpers import assert_all_params_get_grad

BIG = {"clip-vit-b-32", "clip-vit-b-16", "clip-rn50"}


def tiny_inputs(model: ContrastiveModel, batch: int = 2) -> dict[str, torch.Tensor]:
    inputs = {}
    for modality, tower in model.towers.items():
        if modality == "image":
            size = tower.image_size if hasattr(tower, "image_size") else (64, 64)
            size = (size, size) if isinstance(size, int) else size
            inputs["image"] = torch.randn(batch, 3, *size)
        elif modality == "audio":
            inputs["audio"] = torch.randn(batch, 16000) * 0.1
        else:
            ids = torch.randint(1, 1000, (batch, 12))
            ids[:, -1] = 49407  # end of text, the highest id
            inputs["text"] = ids
    return inputs


def test_registry_has_required_names():
    assert {
        "clip-vit-b-32",
        "clip-vit-b-16",
        "clip-rn50",
        "clip-vit-tiny",
        "clap-cnn-tiny",
        "bind-tiny",
    } <= set(list_models())


def test_registry_refuses_duplicates():
    cfg = polymodal.get_model_config("clip-vit-tiny")
    with pytest.raises(ValueError, match="already registered"):
        polymodal.register_model(cfg)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")


def test_config_copy_is_independent():
    cfg = polymodal.get_model_config("clip-vit-tiny")
    cfg.towers["image"].args["width"] = 7
    assert polymodal.get_model_config("clip-vit-tiny").towers["image"].args["width"] == 128


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in list_models()])
def test_forward_backward_every_parameter_learns(name):
    model = create_model(name).train()
    with torch.no_grad():  # zero-initialised residual gammas (CLIP's ResNet) block gradient only at step 0
        for p in model.parameters():
            if not p.any():
                p.add_(torch.randn_like(p) * 0.01)
    inputs = tiny_inputs(model, batch=2)
    out = model(**inputs)
    captioner = model.config.kind == "captioner"  # CoCa: contrastive embeddings plus caption logits
    assert isinstance(out, CaptionOutput if captioner else ContrastiveOutput)
    assert sorted(out.embeddings) == sorted(model.towers)
    for emb in out.embeddings.values():
        assert emb.shape == (2, model.config.embed_dim)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    loss = clip_loss(out.embeddings, out.logit_scale).loss
    if captioner:
        loss = loss + caption_loss(out.caption_logits, out.caption_targets)
    assert_all_params_get_grad(model, loss)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in list_models()])
def test_grad_checkpointing_leaves_outputs_unchanged(name):
    model = create_model(name).train()
    inputs = tiny_inputs(model, batch=1 if name in BIG else 2)
    # BatchNorm statistics update in training mode; compare in eval for the CNN towers
    model.eval()
    ref = model(**inputs).embeddings
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    out = model(**inputs).embeddings
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-6)


def test_encode_functions_and_normalize():
    model = create_model("bind-tiny").eval()
    inputs = tiny_inputs(model)
    img = model.encode_image(inputs["image"])
    torch.testing.assert_close(
        model.encode_image(inputs["image"], normalize=True), img / img.norm(dim=-1, keepdim=True)
    )
    assert model.encode_text(inputs["text"]).shape == (2, 128)
    assert model.encode_audio(inputs["audio"]).shape == (2, 128)
    clip = create_model("clip-vit-tiny")
    with pytest.raises(ValueError, match="no 'audio' tower"):
        clip.encode_audio(torch.randn(2, 16000))
    with pytest.raises(ValueError, match=r"inputs \['audio'\] have no tower"):
        clip(audio=torch.randn(2, 16000))


def test_overrides():
    model = create_model("clip-vit-tiny", image={"image_size": 32}, embed_dim=64, quick_gelu=True)
    assert model.config.towers["image"].args["image_size"] == 32
    # the image transform follows the tower's new input size
    from PIL import Image

    assert polymodal.get_preprocess(model, "image")(Image.new("RGB", (100, 80))).shape == (3, 32, 32)
    assert model.config.embed_dim == 64 and model.alignment.embed_dim == 64
    assert type(model.towers["image"].transformer.blocks[0].mlp.act).__name__ == "QuickGELU"
    with pytest.raises(ValueError, match="unknown override 'wdith'"):
        create_model("clip-vit-tiny", wdith=3)
    with pytest.raises(ValueError, match="has no arguments"):
        create_model("clip-vit-tiny", image={"wdith": 3})


def test_lock_tower():
    model = create_model("clip-vit-tiny")
    model.lock_tower("image")
    assert not any(p.requires_grad for p in model.towers["image"].parameters())
    assert all(p.requires_grad for p in model.towers["text"].parameters())


def test_logit_scale_init_and_clamp():
    model = create_model("clip-vit-tiny")
    torch.testing.assert_close(model(**tiny_inputs(model)).logit_scale, torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.alignment.logit_scale.fill_(10.0)
    torch.testing.assert_close(model.alignment.scale(), torch.tensor(100.0))
    model.alignment.clamp_()
    assert model.alignment.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_sigmoid_bias_option():
    model = create_model("clip-vit-tiny", init_logit_bias=-10.0)
    out = model(**tiny_inputs(model))
    assert out.logit_bias is not None and out.logit_bias.item() == -10.0
    assert create_model("clip-vit-tiny")(**tiny_inputs(model)).logit_bias is None


def test_transforms_and_tokenizer():
    from PIL import Image

    model, train_tf, eval_tf = polymodal.create_model_and_transforms("clip-vit-tiny")
    img = Image.new("RGB", (80, 50), (200, 10, 10))
    assert eval_tf(img).shape == (3, 48, 48) and train_tf(img).shape == (3, 48, 48)
    tok = polymodal.get_tokenizer("clip-vit-tiny")
    ids = tok(["a red circle", "a blue square"])
    assert ids.shape == (2, 32)
    assert model.encode_text(ids).shape == (2, 128)
    _, audio_train, audio_eval = polymodal.create_model_and_transforms("clap-cnn-tiny")
    assert audio_eval(torch.randn(2, 8000), 8000).shape == (16000,)


# ---------------------------------------------------------------------------- config values and input facts


def _tiny_dict(**changes):
    data = polymodal.get_model_config("clip-vit-tiny").to_dict()
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"towers__image__args__width": "wide"}, r"towers.image.args.width must be int, got 'wide' \(str\)"),
        ({"towers__image__args__layers": 2.5}, r"towers.image.args.layers must be int, got 2.5 \(float\)"),
        ({"towers__image__args__layers": True}, r"towers.image.args.layers must be int, got True \(bool\)"),
        ({"towers__image__args__image_size": [48]}, r"towers.image.args.image_size must be int \| tuple\[int, int\]"),
        ({"towers__image__args__pool_type": 3}, r"towers.image.args.pool_type must be str"),
        ({"towers__text__args__output_dim": "128"}, r"towers.text.args.output_dim must be int \| None"),
        ({"embed_dim": None}, r"embed_dim must be int, got None"),
        ({"init_logit_scale": "2.6"}, r"init_logit_scale must be float, got '2.6'"),
        ({"towers": [1, 2]}, r"towers must be a mapping of modality to tower config, got \[1, 2\]"),
        ({"towers__image": "vit"}, r"towers.image must be a mapping of ComponentConfig fields, got str"),
        ({"towers__image__type": 7}, r"towers.image.type must be str, got 7"),
        ({"tokenizer__context_length": "32"}, r"tokenizer.context_length must be int \| None"),
        ({"preprocess__mean": [0.5, "x", 0.5]}, r"preprocess.mean must be list\[float\] \| None"),
        ({"preprocess__image_size": 64}, r"preprocess.image_size 64 disagrees with towers.image.args.image_size 48"),
        ({"tokenizer__context_length": 64}, r"tokenizer.context_length 64 exceeds the text tower's context_length 32"),
        ({"towers__image__wrong": 1}, r"towers.image: unknown keys \['wrong'\]"),
    ],
)
def test_config_values_are_type_checked_before_torch(changes, message):
    # before: a TypeError from inside nn.Conv2d / nn.Linear, or a config that built the wrong model
    with pytest.raises(polymodal.ConfigError, match=message):
        polymodal.ModelConfig.from_dict(_tiny_dict(**changes))


def test_config_files_that_are_not_configs_name_the_file(tmp_path):
    cases = {"not_json": "{'name': 1", "a_list": "[1, 2]", "wrong_type": None}
    saved = tmp_path / "wrong_type"
    create_model("clip-vit-tiny").save_pretrained(saved)
    data = json.loads((saved / "config.json").read_text())
    data["towers"]["image"]["args"]["width"] = "wide"
    for name, text in cases.items():
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps(data) if text is None else text)
    expected = {
        "not_json": "is not valid JSON",
        "a_list": "holds a JSON list; expected an object of config fields",
        "wrong_type": "towers.image.args.width must be int, got 'wide'",
    }
    for name, message in expected.items():
        with pytest.raises(polymodal.ConfigError) as err:
            polymodal.from_pretrained(tmp_path / name)
        assert str(tmp_path / name / "config.json") in str(err.value) and message in str(err.value)
        assert "\n" not in str(err.value)


def test_input_spec_reads_the_config_then_the_constructor():
    import inspect

    from polymodal.encoders import AudioSpectrogramCNN, VisionTransformer, image_transform

    clip = polymodal.get_model_config("clip-vit-tiny")
    spec = clip.input_spec("image")
    assert (spec.image_size, spec.channels, spec.interpolation, spec.resize_mode) == (
        (48, 48),
        3,
        "bicubic",
        "shortest",
    )
    assert spec.sample_rate is None and spec.context_length is None
    assert clip.input_spec("text").context_length == 32
    # unset in the preprocess config and the tower: the constructor's default, not a restated literal
    bare = polymodal.ModelConfig(
        "bare", {"image": {"type": "vit"}, "audio": {"type": "audio_cnn"}, "text": {"type": "text_transformer"}}
    )
    vit_default = inspect.signature(VisionTransformer).parameters["image_size"].default
    assert bare.input_spec("image").image_size == (vit_default, vit_default)
    assert bare.input_spec("image").mean == tuple(inspect.signature(image_transform).parameters["mean"].default)
    rate = inspect.signature(AudioSpectrogramCNN).parameters["sample_rate"].default
    assert bare.input_spec("audio").sample_rate == rate
    assert bare.input_spec("audio").clip_seconds == DEFAULT_CLIP_SECONDS
    assert bare.input_spec("text").context_length == 77  # TextTransformer's default context
    with pytest.raises(polymodal.InputError, match="has no 'audio' tower"):
        clip.input_spec("audio")


def test_one_sample_rate_for_audio():
    # before: the tower's rate, the preprocess rate or 16000 depending on who asked
    data = polymodal.get_model_config("clap-cnn-tiny").to_dict()
    data["towers"]["audio"]["args"]["sample_rate"] = 22050
    data["preprocess"]["sample_rate"] = None
    config = polymodal.ModelConfig.from_dict(data)
    assert config.input_spec("audio").sample_rate == 22050
    assert polymodal.get_preprocess(config, "audio").sample_rate == 22050
    data["towers"]["audio"]["args"].pop("sample_rate")
    data["preprocess"]["sample_rate"] = 8000  # the tower would be built for its default, 16000
    with pytest.raises(polymodal.ConfigError, match="preprocess.sample_rate 8000 disagrees"):
        polymodal.ModelConfig.from_dict(data)
    model = create_model("clap-cnn-tiny", audio={"sample_rate": 8000})  # an override moves both
    assert model.config.input_spec("audio").sample_rate == 8000 == model.towers["audio"].sample_rate


def test_decoder_config_is_checked_when_built():
    data = polymodal.get_model_config("coca-vit-tiny").to_dict()
    data["decoder"]["type"] = "lstm"
    expected = r"decoder: unknown type 'lstm'; expected one of \['multimodal', 'transformer'\]"
    with pytest.raises(polymodal.ConfigError, match=expected):
        polymodal.ModelConfig.from_dict(data)
    data["decoder"]["type"] = "transformer"
    data["decoder"]["args"]["layers"] = "two"
    config = polymodal.ModelConfig.from_dict(data)  # validating does not import the decoder's class
    with pytest.raises(polymodal.ConfigError, match="decoder.args.layers must be int, got 'two'"):
        create_model(config)
    assert sorted(decoder_types()) == sorted(DECODER_TYPES)


def test_query_modality_is_derived_from_the_towers():
    assert polymodal.get_model_config("clip-vit-tiny").query_modality == "image"
    assert polymodal.get_model_config("clap-cnn-tiny").query_modality == "audio"
    assert polymodal.get_model_config("bind-tiny").query_modality == "image"
    _, train_tf, _ = polymodal.create_model_and_transforms("clap-cnn-tiny")
    assert type(train_tf).__name__ == "AudioPreprocess"


@pytest.mark.parametrize(
    ("annotation", "good", "bad"),
    [
        ("int", [3, -1], [3.0, True, "3", None]),
        ("float", [1, 2.5], ["2.5", False, None]),
        ("bool", [True], [1, "true"]),
        ("Optional[int]", [None, 4], [4.5]),
        ("Literal['cls', 'avg']", ["cls", "avg"], ["max", 1]),
        ("tuple[int, int]", [(1, 2), [1, 2]], [(1,), (1, 2, 3), (1, "2")]),
        ("tuple[float, ...]", [(), (1, 2.5)], [(1, "x")]),
        ("Sequence[int]", [[16, 32]], [[16, 3.5], 16]),
        ("dict[str, int]", [{"a": 1}], [{"a": "1"}, {1: 1}, [("a", 1)]]),
        ("str | Callable[[], nn.Module]", ["gelu", torch.nn.GELU], [3]),
        ("str | os.PathLike | None", ["x", None], [3]),
    ],
)
def test_check_value_follows_the_annotation(annotation, good, bad):
    from polymodal.value_types import check_value

    for value in good:
        check_value(value, annotation, "field")
    for value in bad:
        with pytest.raises(polymodal.ConfigError, match=r"^field must be "):
            check_value(value, annotation, "field")
    # a type the checker does not know (imported only for type checking) is accepted, not guessed at
    check_value(object(), "PretrainedConfig | None", "field")
