"""Every registered model: builds, runs forward and backward, every parameter learns, checkpointing is exact."""

import pytest
import torch

import polymodal
from polymodal import ContrastiveModel, ContrastiveOutput, create_model, list_models
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
