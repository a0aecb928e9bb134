import dataclasses
import math
from pathlib import Path
from typing import Literal

import pytest
import torch

from polymodal import create_model
from polymodal.errors import ConfigError
from polymodal.train import DataSection, TrainConfig, load_config
from polymodal.train.config import parse_section, parse_value
from polymodal.train.optim import build_optimizer, cosine_with_warmup, parameter_groups, warmup_cosine_schedule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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


def test_the_demo_models_parameter_groups():
    """The one weight-decay rule: of the matrices, only the position and token embeddings escape decay."""
    model = create_model("clip-vit-tiny")
    decay, no_decay = parameter_groups(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in no_decay["params"] if p.ndim >= 2] == [
        "towers.image.pos_embed",
        "towers.text.pos_embed",
        "towers.text.token_embedding.weight",
    ]
    assert len(decay["params"]) == 35 and len(decay["params"]) + len(no_decay["params"]) == 110
    assert all(p.ndim >= 2 for p in decay["params"])
    opt = build_optimizer(model, TrainConfig().optim)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in (decay, no_decay)
    ]


def test_lr_scales_by_prefix_keep_the_decay_rule():
    model = create_model("clip-vit-tiny")
    groups = parameter_groups(model, lr=1e-2, weight_decay=0.1, lr_scales={"towers.": 0.1, "towers.text.": 0.5})
    by_name = {n: p for n, p in model.named_parameters()}
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(by_name["alignment.logit_scale"])] == (1e-2, 0.0)
    assert lr_of[id(by_name["towers.image.pos_embed"])] == pytest.approx((1e-3, 0.0))
    assert lr_of[id(by_name["towers.text.token_embedding.weight"])] == pytest.approx((5e-3, 0.0))
    assert lr_of[id(by_name["towers.image.patch_embed.weight"])] == pytest.approx((1e-3, 0.1))


def test_the_schedule_object_follows_the_multiplier():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([{"params": [param], "lr": 0.5}])
    schedule = warmup_cosine_schedule(opt, total_steps=20, warmup_steps=4, min_ratio=0.1)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * cosine_with_warmup(step, 20, 4, 0.1)), step
        opt.step()
        schedule.step()


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: 10\nmodel:\n  name: [clip\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{str(path)!r} is not valid YAML at line 4, column 1: ")
    assert "<unicode string>" not in message and "\n" not in message


@pytest.mark.parametrize(
    "data, match",
    [
        ({"steps": "ten"}, "steps must be int, got 'ten'"),
        ({"optim": {"lr": -1.0}}, "optim.lr must be positive, got -1.0"),
        ({"optim": {"betas": [1.0, 0.9]}}, r"optim.betas must lie in \[0, 1\), got \[1.0, 0.9\]"),
        ({"optim": {"max_nonfinite": 0}}, "optim.max_nonfinite must be >= 1"),
        ({"optim": {"loss_tile": 0}}, r"optim.loss_tile must be auto, null or a positive integer \(e.g. 4096\), got 0"),
        ({"optim": {"loss_tile": "big"}}, "optim.loss_tile must be auto, null or a positive integer"),
        ({"optim": {"loss_tile": True}}, "optim.loss_tile must be int, got True"),
        ({"data": {"num_workers": -1}}, "data.num_workers must be >= 0, got -1"),
        ({"data": {"skip_budget": 2}}, r"data.skip_budget must lie in \[0, 1\], got 2.0"),
        ({"eval_subset": -5}, "eval_subset must be >= 0"),
        ({"log_every": 0}, "log_every must be positive"),
        ({"model": "clip-vit-tiny"}, "model must be a mapping, got str"),
        ({"model": {"lock": {"image": "all"}}}, "model.lock.image must be int, got 'all'"),
        ({"distributed": {"strategy": "zero3"}}, "distributed.strategy must be ddp or fsdp, got 'zero3'"),
        ({"distributed": {"strategy": "fsdp"}, "precision": "fp16"}, "precision fp16 does not go with .* fsdp"),
        ({"distributed": {"shards": 2}}, r"unknown key\(s\) \['shards'\] in distributed"),
    ],
)
def test_values_are_checked_before_they_reach_torch(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_a_file_error_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{repr(str(path))}: optim.lr must be float, got 'fast'$"):
        load_config(path)


def test_default_num_workers_is_what_the_recipes_measured():
    """On 2 cores a loader worker competes with the compute threads (the demo ran 20% slower with one)."""
    assert DataSection().num_workers == 0
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        assert load_config(recipe).data.num_workers == 0, recipe.name


def test_command_line_values():
    assert parse_value("3") == 3 and parse_value("3e-4") == "3e-4" and parse_value("0.5") == 0.5
    assert parse_value("[1, 2]") == [1, 2] and parse_value("null") is None and parse_value("") == ""
    assert parse_value("a: b: c") == "a: b: c"  # not YAML: the text itself


def test_sections_parse_nested_literal_and_list_fields():
    @dataclasses.dataclass
    class Inner:
        k: int = 1

    @dataclasses.dataclass
    class Outer:
        mode: Literal["a", "b"] = "a"
        sizes: list[int] = dataclasses.field(default_factory=list)
        inner: Inner = dataclasses.field(default_factory=Inner)

    assert parse_section(Outer, {"mode": "b", "sizes": [1, 2], "inner": {"k": 3}}, "task_args") == Outer(
        "b", [1, 2], Inner(3)
    )
    with pytest.raises(ConfigError, match=r"task_args.mode must be one of \['a', 'b'\], got 'c'"):
        parse_section(Outer, {"mode": "c"}, "task_args")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['j'\] in task_args.inner"):
        parse_section(Outer, {"inner": {"j": 3}}, "task_args")
    with pytest.raises(ConfigError, match="task_args.sizes must be int, got 'x'"):
        parse_section(Outer, {"sizes": [1, "x"]}, "task_args")
