"""LoRA adapters (peft) on polymodal's towers: what trains, save / load / merge, and refusals; WiSE-FT interpolation."""

import copy

import pytest
import torch

import polymodal
from polymodal.config import LoraConfig
from polymodal.errors import ConfigError
from polymodal.interpolate import interpolate_models
from polymodal.lora import (
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    add_lora,
    base_fingerprint,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from polymodal.tasks.model_identity import weights_fingerprint

TINY = {
    "image": {"image_size": 32, "width": 32, "layers": 2, "heads": 2},
    "text": {"width": 32, "layers": 2, "heads": 2},
}


def tiny(seed: int = 0, name: str = "clip-vit-tiny", **overrides):
    torch.manual_seed(seed)
    return polymodal.create_model(name, **{**TINY, **overrides}).eval()


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 1000, (3, 32), generator=g)
    text[:, 10:] = 0
    text[:, 9] = 49407  # end of text, where the tower pools
    return {"image": torch.randn(3, 3, 32, 32, generator=g), "text": text}


def embeddings(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(**inputs()).embeddings


def randomise_adapters(model, seed: int = 2) -> None:
    """LoRA's B starts at zero (the adapter adds nothing); give every adapter weight a value instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_new_adapters_change_nothing_and_only_they_train():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = embeddings(model)
    add_lora(model, LoraConfig(towers=["image", "text"], r=4))
    assert base_fingerprint(model) == weights_fingerprint(tiny())  # with or without adapters
    for m, e in embeddings(model).items():
        torch.testing.assert_close(e, reference[m], rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    towers = {n for n in trainable if n.startswith("towers.")}
    assert towers and all(".lora_A." in n or ".lora_B." in n for n in towers)
    assert trainable - towers == {"alignment.logit_scale"}  # outside the towers, training goes on as usual
    # qkv, proj, fc1 and fc2 of both blocks, plus each tower's output projection (also named proj)
    assert len(towers) == 2 * 2 * (2 * 4 + 1)
    share = sum(p.numel() for n, p in model.named_parameters() if n in towers) / sum(
        p.numel() for p in model.parameters()
    )
    assert share < 0.02

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        out = model(**inputs())
        logits = out.embeddings["image"] @ out.embeddings["text"].T * out.logit_scale
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith("towers."):
            continue
        layer, leaf = key.rsplit(".", 1)
        wrapped = f"{layer}.base_layer.{leaf}"  # where peft keeps an adapted layer's own weight
        assert (key in after) != (wrapped in after), key
        assert torch.equal(after.get(key, after.get(wrapped)), value), key  # the base stays bit-identical
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora_state_dict(model).items() if "lora_B" in k)


def test_adapted_model_saves_and_loads_like_any_model(tmp_path):
    model = add_lora(tiny(), LoraConfig(towers=["image"], r=2, alpha=4, targets=["qkv", "fc2"]))
    randomise_adapters(model)
    model.save_pretrained(tmp_path / "adapted")
    loaded = polymodal.from_pretrained(tmp_path / "adapted").eval()
    assert loaded.config.lora == model.config.lora
    for m, e in embeddings(loaded).items():
        assert torch.equal(e, embeddings(model)[m])


def test_adapter_alone_round_trip_size_and_merge(tmp_path):
    model = add_lora(tiny(), LoraConfig(towers=["image", "text"], r=4))
    randomise_adapters(model)
    adapted = embeddings(model)
    save_adapter(model, tmp_path / "adapter", base={"model": "somewhere"})
    model.save_pretrained(tmp_path / "full")
    small, full = (
        (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size,
        (tmp_path / "full/model.safetensors").stat().st_size,
    )
    assert small < 0.05 * full

    onto = load_adapter(tiny(), tmp_path / "adapter").eval()
    for m, e in embeddings(onto).items():
        assert torch.equal(e, adapted[m])
    merged = merge_lora(onto)
    assert merged.config.lora is None
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    for m, e in embeddings(merged).items():
        torch.testing.assert_close(e, adapted[m], rtol=0, atol=1e-5)
    # a plain model again: it saves, loads and exports like one
    merged.save_pretrained(tmp_path / "merged")
    again = polymodal.from_pretrained(tmp_path / "merged").eval()
    assert set(again.state_dict()) == set(tiny().state_dict())
    polymodal.export_model(again, tmp_path / "hf", to="hf")
    with pytest.raises(polymodal.CheckpointError, match="merge them first"):
        polymodal.export_model(model, tmp_path / "hf2", to="hf")


def test_an_adapter_on_the_wrong_base_is_refused(tmp_path):
    model = add_lora(tiny(seed=0), LoraConfig(towers=["image"], r=2))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        load_adapter(tiny(seed=1), tmp_path / "adapter")  # same architecture, other weights
    wider = {"image": {**TINY["image"], "width": 64}}
    with pytest.raises(AdapterMismatchError, match="another architecture"):
        load_adapter(tiny(seed=0, **wider), tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="already has LoRA adapters"):
        load_adapter(copy.deepcopy(model), tmp_path / "adapter")


def test_hf_text_tower_takes_adapters_on_its_own_layer_names():
    from transformers import BertConfig

    from polymodal.config import ComponentConfig, ModelConfig

    bert = {
        "model_type": "bert",
        **BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
        ).to_diff_dict(),
    }
    config = ModelConfig(
        name="vit-bert",
        embed_dim=16,
        towers={
            "image": ComponentConfig(
                "vit", {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "output_dim": 16}
            ),
            "text": ComponentConfig("hf_text", {"config": bert, "output_dim": 16, "pool_type": "mean"}),
        },
    )
    torch.manual_seed(0)
    model = polymodal.create_model(config).eval()
    text = torch.randint(3, 100, (2, 8))
    before = model.encode_text(text)
    add_lora(model, LoraConfig(towers=["text"], r=2, targets=["query", "value"]))
    assert len([k for k in lora_state_dict(model) if "lora_A" in k]) == 2 * 2
    torch.testing.assert_close(model.encode_text(text), before, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="match no linear layer of the 'text' tower"):
        add_lora(polymodal.create_model(config), LoraConfig(towers=["text"], targets=["qkv"]))


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (
            {"towers": ["image"], "targets": ["nope"]},
            "lora.targets ['nope'] match no linear layer of the 'image' tower",
        ),
        ({"towers": ["image", "text"], "targets": ["qkv", "nope"]}, "lora.targets ['nope'] match no linear layer"),
        ({"towers": ["image"], "r": 0}, "lora.r must be a positive integer"),
        ({"towers": ["image"], "r": -2}, "lora.r must be a positive integer"),
        ({"towers": ["audio"]}, "lora.towers names ['audio']"),
        ({"towers": []}, "lora.towers is empty"),
        ({"towers": ["image"], "dropout": 1.0}, "lora.dropout must be in [0, 1)"),
    ],
)
def test_bad_lora_configs_are_refused(lora, message):
    with pytest.raises(ConfigError) as err:
        add_lora(tiny(), LoraConfig(**lora))
    assert message in str(err.value)


def test_cnn_towers_are_refused():
    model = polymodal.create_model("clip-rn50", image={"layers": [1, 1, 1, 1], "width": 8, "image_size": 32})
    with pytest.raises(ConfigError, match="LoRA adapts transformer towers"):
        add_lora(model, LoraConfig(towers=["image"]))


def test_interpolation_end_points_middle_and_refusals():
    a, b = tiny(seed=0), tiny(seed=1)
    for alpha, expected in ((0, a), (1, b)):
        out = interpolate_models(a, b, alpha)
        for k, v in out.state_dict().items():
            assert torch.equal(v, expected.state_dict()[k]), k
    half = interpolate_models(a, b, 0.25).state_dict()
    for k, v in half.items():
        torch.testing.assert_close(v, 0.75 * a.state_dict()[k] + 0.25 * b.state_dict()[k], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="differ in architecture"):
        interpolate_models(a, tiny(image={**TINY["image"], "layers": 3}), 0.5)
    with pytest.raises(ConfigError, match="alpha must be a number from 0"):
        interpolate_models(a, b, 1.5)
    with pytest.raises(ConfigError, match="has LoRA adapters; merge them first"):
        interpolate_models(a, add_lora(tiny(seed=1), LoraConfig(towers=["image"])), 0.5)
