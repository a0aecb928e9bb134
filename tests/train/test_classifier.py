"""The classifier loop on polymodal's one optimiser recipe: the weight-decay rule and the schedule of
``polymodal.train.optim``, and that it learns."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polymodal import create_model
from polymodal.errors import InputError
from polymodal.tasks import ClassificationHead, evaluate_classifier
from polymodal.train.classifier import build_classifier_optimizer, train_classifier
from polymodal.train.optim import cosine_with_warmup


def tiny_vit():
    overrides = {"image": {"image_size": 32, "width": 32, "layers": 1, "heads": 2}}
    return create_model("clip-vit-tiny", **overrides).towers["image"]


def test_position_embeddings_are_not_decayed_and_the_encoder_lr_is_scaled():
    model = ClassificationHead(tiny_vit(), 5)
    optimizer, _ = build_classifier_optimizer(model, steps=10, lr=1e-2, weight_decay=0.1, lr_scales={"encoder.": 0.1})
    settings = {n: None for n, _ in model.named_parameters()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            settings[by_id[id(p)]] = (group["initial_lr"], group["weight_decay"])
    # an (N, width) table: a rule that decays every tensor with 2+ dimensions decays it
    assert model.encoder.pos_embed.ndim == 2
    assert settings["encoder.pos_embed"] == pytest.approx((1e-3, 0.0))
    assert settings["encoder.patch_embed.weight"] == pytest.approx((1e-3, 0.1))
    assert settings["head.weight"] == (1e-2, 0.1) and settings["head.bias"] == (1e-2, 0.0)
    assert None not in settings.values()


def test_the_schedule_is_the_trainers():
    model = nn.Linear(4, 3)
    optimizer, schedule = build_classifier_optimizer(model, steps=40, lr=0.1)  # warm-up: 5% of the steps
    for step in range(40):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * cosine_with_warmup(step, 40, 2)), step
        optimizer.step()
        schedule.step()


def test_a_head_over_a_frozen_encoder_learns_separable_classes():
    torch.manual_seed(0)
    centres = torch.randn(3, 6) * 4
    y = torch.randint(0, 3, (600,))
    x = centres[y] + torch.randn(600, 6)
    encoder = nn.Linear(6, 6)
    encoder.output_dim = 6
    model = ClassificationHead(encoder, 3, freeze_encoder=True)
    before = encoder.weight.clone()
    loader = DataLoader(TensorDataset(x[:500], y[:500]), batch_size=50, shuffle=True)
    losses = train_classifier(model, loader, steps=60, lr=5e-2, progress=False)
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10]) / 3
    assert torch.equal(encoder.weight, before)
    result = evaluate_classifier(model, DataLoader(TensorDataset(x[500:], y[500:]), batch_size=64), ["a", "b", "c"])
    assert result.top1 > 0.95


def test_bad_settings_are_input_errors():
    model = nn.Linear(6, 2)
    pair = [(torch.randn(2, 6), torch.tensor([0, 1]))]
    with pytest.raises(InputError, match="no labelled samples in a whole pass"):
        train_classifier(model, [], steps=3, progress=False)
    with pytest.raises(InputError, match="steps must be a positive integer, got 0"):
        train_classifier(model, pair, steps=0, progress=False)
    with pytest.raises(InputError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        train_classifier(model, pair, steps=1, label_smoothing=1.0, progress=False)
