import math

import pytest
import torch

from polymodal import create_model
from polymodal.train import TrainConfig, load_config
from polymodal.train.optim import build_optimizer, cosine_with_warmup


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 10\nmodel:\n  name: clip-vit-tiny\noptim:\n  lr: 0.01\n  betas: [0.8, 0.9]\n")
    cfg = load_config(path, ["optim.lr=3e-4", "data.batch_size=64", "model.lock={image: 1}", "resume=null"])
    assert cfg.steps == 10 and cfg.optim.lr == 3e-4 and cfg.data.batch_size == 64
    assert cfg.optim.betas == (0.8, 0.9) and cfg.model.lock == {"image": 1} and cfg.resume is None
    # the resolved config round-trips through YAML
    again = TrainConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "data, match",
    [
        ({"optim": {"lrr": 1}}, r"unknown key\(s\) \['lrr'\] in optim"),
        ({"precision": "fp8"}, "precision must be"),
        ({"data": {"source": "csv"}}, "data.train"),
        ({"steps": 0}, "steps must be positive"),
        ({"data": {"source": "csv", "train": "x.csv", "builtin": {"max_rotation": 9}}}, "built-in data"),
    ],
)
def test_bad_config(data, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_builtin_data_options_reach_the_generator():
    from polymodal import get_tokenizer
    from polymodal.train.data import build_datasets

    model_config = create_model("clip-vit-tiny").config
    cfg = TrainConfig.from_dict({"data": {"train_size": 200, "builtin": {"two_shape_share": 1.0}}}).data
    data = build_datasets(cfg, model_config, get_tokenizer("clip-vit-tiny"), None, None)
    assert all(data.train[i]["meta"]["num_shapes"] == 2 for i in range(20))
    assert all(data.eval[i]["meta"]["num_shapes"] == 1 for i in range(20))  # held-out images show one shape
    cfg.builtin = {"two_shapes": 1.0}
    with pytest.raises(ValueError, match=r"unknown options \['two_shapes'\] for ShapesDataset.*two_shape_share"):
        build_datasets(cfg, model_config, get_tokenizer("clip-vit-tiny"), None, None)


def test_no_weight_decay_on_norms_biases_embeddings_temperature():
    model = create_model("clip-vit-tiny")
    opt = build_optimizer(model, TrainConfig().optim)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for n in (
        "alignment.logit_scale",
        "towers.text.token_embedding.weight",
        "towers.image.pos_embed",
        "towers.image.cls_token",
        "towers.image.norm.weight",
        "towers.image.transformer.blocks.0.attn.qkv.bias",
    ):
        assert n in no_decay_names, n
    assert "towers.image.transformer.blocks.0.attn.qkv.weight" in decay_names
    assert "towers.image.patch_embed.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == sum(1 for _ in model.parameters())


def test_cosine_schedule():
    values = [cosine_with_warmup(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert cosine_with_warmup(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert torch.tensor(values).max() <= 1.0
