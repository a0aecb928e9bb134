"""Explanation maps: their layout, Grad-CAM and rollout against hand-written references, the errors, the
overlay PNGs, and the pointing game of a trained model against its random baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polymodal import from_pretrained, get_preprocess, get_tokenizer
from polymodal.datasets import shape_pointing_samples
from polymodal.encoders import record_attention
from polymodal.errors import InputError
from polymodal.tasks import (
    attention_rollout,
    explain,
    gradient_rollout,
    input_spectrogram,
    normalize_maps,
    plot_explanation,
    plot_explanation_grid,
    pointing_game,
    pointing_hits,
)
from tests.helpers import tiny_contrastive

TEXT = "a red circle"


@pytest.fixture(scope="module")
def vit_model():
    return tiny_contrastive(
        "clip-vit-tiny", {"image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}}
    )


@pytest.fixture(scope="module")
def resnet_model():
    image = {"layers": [1, 1, 1, 1], "width": 8, "heads": 2, "image_size": 64, "output_dim": 16}
    return tiny_contrastive("clip-rn50", {"image": image})


@pytest.fixture(scope="module")
def audio_model():
    return tiny_contrastive("clap-cnn-tiny", {"audio": {"channels": [8, 8, 16, 16], "output_dim": 16}})


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("model_name", "method", "size"),
    [
        ("vit_model", "gradcam", 32),
        ("vit_model", "rollout", 32),
        ("vit_model", "grad_rollout", 32),
        ("vit_model", "saliency", 32),
        ("resnet_model", "gradcam", 64),
    ],
)
def test_image_maps_have_the_images_layout_and_lie_in_0_1(request, model_name, method, size):
    model = request.getfixturevalue(model_name)
    maps = explain(model, "image", images(size), TEXT, get_tokenizer(model), method)
    assert maps.shape == (2, size, size) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).amax(1) == 1).all()  # each map is scaled to reach 1


def test_audio_saliency_lies_over_the_spectrogram(audio_model):
    waveforms = torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    maps = explain(audio_model, "audio", waveforms, "a high beep", get_tokenizer(audio_model))  # saliency by default
    spectrogram = input_spectrogram(audio_model, waveforms)
    assert maps.shape == spectrogram.shape == (2, 64, 51)  # (B, n_mels, frames)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and (maps.flatten(1).amax(1) == 1).all()


def similarity(model, x: torch.Tensor, text: str) -> torch.Tensor:
    target = model.encode("text", get_tokenizer(model)([text]), normalize=True)
    return (model.encode("image", x, normalize=True) * target).sum(-1)


def upsampled(cam: torch.Tensor, size: int) -> torch.Tensor:
    return normalize_maps(F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0])


def test_vit_gradcam_is_the_gradient_weighted_patch_tokens_entering_the_last_block(vit_model):
    x, seen = images(32), {}

    def keep(block, args):
        seen["tokens"] = args[0]

    handle = vit_model.towers["image"].transformer.blocks[-1].register_forward_pre_hook(keep)
    try:
        score = similarity(vit_model, x, TEXT).sum()
    finally:
        handle.remove()
    tokens = seen["tokens"][:, 1:]  # (B, 16 patches, width), the class token left out
    (grad,) = torch.autograd.grad(score, seen["tokens"])
    weights = grad[:, 1:].mean(dim=1, keepdim=True)  # (B, 1, width): each channel's mean gradient
    cam = F.relu((weights * tokens).sum(-1)).reshape(2, 4, 4).detach()
    got = explain(vit_model, "image", x, TEXT, get_tokenizer(vit_model), "gradcam")
    torch.testing.assert_close(got, upsampled(cam, 32), rtol=0, atol=1e-5)


def test_resnet_gradcam_is_the_gradient_weighted_last_stage(resnet_model):
    x, seen = images(64), {}
    handle = resnet_model.towers["image"].layer4.register_forward_hook(lambda m, a, out: seen.update(fmap=out))
    try:
        score = similarity(resnet_model, x, TEXT).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, seen["fmap"])  # (B, C, 2, 2)
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * seen["fmap"]).sum(1)).detach()
    got = explain(resnet_model, "image", x, TEXT, get_tokenizer(resnet_model), "gradcam")
    torch.testing.assert_close(got, upsampled(cam, 64), rtol=0, atol=1e-5)


def test_rollout_equals_explicit_matrix_products(vit_model):
    vit, x = vit_model.towers["image"], images(32)
    with torch.no_grad(), record_attention(vit) as records:
        vit(x)
    blocks = [w[0].double().numpy() for w in records.values()]  # each (B, heads, 17, 17)
    expected = []
    for b in range(2):
        total = np.eye(17)
        for weights in blocks:  # first block first; the residual adds the identity, rows renormalised
            a = weights[b].mean(0) + np.eye(17)
            a = a / a.sum(1, keepdims=True)
            total = a @ total
        expected.append(total)
    expected = torch.from_numpy(np.stack(expected))
    torch.testing.assert_close(attention_rollout([w[0] for w in records.values()]).double(), expected)
    got = explain(vit_model, "image", x, TEXT, get_tokenizer(vit_model), "rollout")
    cls_row = expected[:, 0, 1:].reshape(2, 4, 4).float()  # the class token's row over the 16 patches
    torch.testing.assert_close(got, upsampled(cls_row, 32), rtol=0, atol=1e-5)
    # from the second block on: that block's matrix alone
    second = torch.from_numpy(blocks[1]).mean(1) + torch.eye(17, dtype=torch.float64)
    torch.testing.assert_close(attention_rollout([w[0] for w in records.values()], start=1).double(), second / 2)


def test_gradient_rollout_equals_explicit_products_of_gradient_weighted_attention(vit_model):
    vit, x = vit_model.towers["image"], images(32)
    with record_attention(vit) as records:
        score = similarity(vit_model, x, TEXT).sum()
    weights = [w[0] for w in records.values()]
    grads = [g.double().numpy() for g in torch.autograd.grad(score, weights)]
    blocks = [w.detach().double().numpy() for w in weights]
    expected = []
    for b in range(2):
        relevance = np.eye(17)
        for a, g in zip(blocks, grads):
            relevance = relevance + np.maximum(g[b] * a[b], 0).mean(0) @ relevance
        expected.append(relevance)
    expected = torch.from_numpy(np.stack(expected))
    grads_t = [torch.from_numpy(g) for g in grads]
    torch.testing.assert_close(gradient_rollout([torch.from_numpy(a) for a in blocks], grads_t), expected)
    got = explain(vit_model, "image", x, TEXT, get_tokenizer(vit_model), "grad_rollout")
    torch.testing.assert_close(got, upsampled(expected[:, 0, 1:].reshape(2, 4, 4).float(), 32), rtol=0, atol=1e-5)


def test_shifted_copies_average_to_a_finer_map(vit_model):
    x, tok = images(32), get_tokenizer(vit_model)
    plain = explain(vit_model, "image", x, TEXT, tok, "grad_rollout")
    torch.testing.assert_close(explain(vit_model, "image", x, TEXT, tok, "grad_rollout", shifts=1), plain)
    fine = explain(vit_model, "image", x, TEXT, tok, "grad_rollout", shifts=2)
    # by hand: the copies moved down and right by 0 or 4 pixels (half a patch), edge pixels repeated
    padded = F.pad(x, (8, 8, 8, 8), mode="replicate")
    total, count = torch.zeros(2, 32, 32), torch.zeros(32, 32)
    for dy in (0, 4):
        for dx in (0, 4):
            moved = explain(
                vit_model, "image", padded[..., 8 - dy : 40 - dy, 8 - dx : 40 - dx], TEXT, tok, "grad_rollout"
            )
            total[:, : 32 - dy, : 32 - dx] += moved[:, dy:, dx:]
            count[: 32 - dy, : 32 - dx] += 1
    torch.testing.assert_close(fine, normalize_maps(total / count), rtol=0, atol=1e-5)
    assert not torch.allclose(fine, plain)


def test_upscale_explains_the_resized_image_and_returns_the_images_layout(vit_model, resnet_model):
    x, tok = images(32), get_tokenizer(vit_model)
    fine = explain(vit_model, "image", x, TEXT, tok, "grad_rollout", upscale=1.5)  # 48 pixels: a 6 x 6 patch grid
    assert fine.shape == (2, 32, 32) and torch.isfinite(fine).all()
    # by hand: the image resized to 48 (a multiple of the patch, 8), explained there, the map resized back
    big = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False)
    there = explain(vit_model, "image", big, TEXT, tok, "grad_rollout")
    back = F.interpolate(there[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(fine, normalize_maps(back), rtol=0, atol=1e-5)
    # 1.2 x 32 = 38.4 rounds to 40, the nearest multiple of the patch
    got = explain(vit_model, "image", x, TEXT, tok, "grad_rollout", upscale=1.2)
    at40 = explain(
        vit_model,
        "image",
        F.interpolate(x, size=(40, 40), mode="bicubic", align_corners=False),
        TEXT,
        tok,
        "grad_rollout",
    )
    back = F.interpolate(at40[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, normalize_maps(back), rtol=0, atol=1e-5)
    # a ResNet's maps at 2x (128 pixels, a multiple of its stride 32) still come back at 64
    assert explain(resnet_model, "image", images(64), TEXT, tok, upscale=2).shape == (2, 64, 64)


def test_pointing_game_scores_the_maps_explain_gives(vit_model):
    x, tok = images(32, n=16), get_tokenizer(vit_model)
    masks = torch.rand(16, 32, 32, generator=torch.Generator().manual_seed(3)) < 0.3
    texts = ["a red circle", "a blue square", "a green ring", "a circle"] * 4
    for shifts, upscale in ((1, 1.0), (2, 1.5)):
        scores = pointing_game(vit_model, x, texts, masks, tok, ("grad_rollout",), 4, shifts=shifts, upscale=upscale)
        maps = explain(vit_model, "image", x, texts, tok, "grad_rollout", shifts=shifts, upscale=upscale)
        assert scores["grad_rollout"].hits == int(pointing_hits(maps, masks).sum())
        assert scores["grad_rollout"].baseline == pytest.approx(masks.float().mean().item())


def test_bad_requests_are_named(vit_model, resnet_model, audio_model):
    tok = get_tokenizer(vit_model)
    with pytest.raises(InputError, match="no audio tower"):
        explain(vit_model, "audio", torch.randn(1, 16000), TEXT, tok)
    with pytest.raises(InputError, match="no image tower"):
        explain(audio_model, "image", images(32), TEXT, tok)
    with pytest.raises(InputError, match="text to explain is empty"):
        explain(vit_model, "image", images(32), "  ", tok)
    with pytest.raises(InputError, match="unknown explanation method 'lime'; expected one of gradcam, rollout, grad_"):
        explain(vit_model, "image", images(32), TEXT, tok, "lime")
    with pytest.raises(InputError, match="rollout cannot explain this model's image tower, a ResNetEncoder"):
        explain(resnet_model, "image", images(64), TEXT, tok, "rollout")
    with pytest.raises(InputError, match="shifts refine a ViT's patch grid; this image tower is a ResNetEncoder"):
        explain(resnet_model, "image", images(64), TEXT, tok, shifts=2)
    with pytest.raises(InputError, match="shifts must be a positive integer"):
        explain(vit_model, "image", images(32), TEXT, tok, shifts=0)
    for bad in (0.5, 9, True, "2"):
        with pytest.raises(InputError, match="upscale must be a number from 1"):
            explain(vit_model, "image", images(32), TEXT, tok, upscale=bad)
    with pytest.raises(InputError, match="upscale resizes images; the audio tower's input is not an image"):
        explain(audio_model, "audio", torch.randn(1, 16000), TEXT, tok, upscale=2)
    with pytest.raises(InputError, match="one text, or one per input"):
        explain(vit_model, "image", images(32, n=3), [TEXT, TEXT], tok)
    with pytest.raises(InputError, match="must both be"):
        pointing_hits(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))


def test_overlays_are_pngs_written_once(vit_model, audio_model, tmp_path):
    x = images(32)
    maps = explain(vit_model, "image", x, TEXT, get_tokenizer(vit_model))
    spec = vit_model.config.input_spec("image")
    path = plot_explanation(maps[0], x[0], tmp_path / "one.png", TEXT, spec.mean, spec.std)
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100
    with pytest.raises(FileExistsError):
        plot_explanation(maps[0], x[0], path, TEXT, spec.mean, spec.std)
    waveforms = torch.randn(2, 16000)
    sounds = explain(audio_model, "audio", waveforms, "a beep", get_tokenizer(audio_model))
    grid = plot_explanation_grid([*maps, *sounds], [*x, *input_spectrogram(audio_model, waveforms)], tmp_path / "g.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "one.png"]
    with pytest.raises(ValueError, match="one size"):
        plot_explanation(maps[0][:16], x[0], tmp_path / "bad.png")
    assert grid.is_file()


def test_a_trained_model_points_at_the_named_shape_far_above_chance(trained_shapes_run):
    model = from_pretrained(trained_shapes_run).eval()
    transform, tokenizer = get_preprocess(model, "image"), get_tokenizer(model)
    samples = shape_pointing_samples(120, seed=11, image_size=48)  # a data seed the model never trained on
    x = torch.stack([transform(s.image) for s in samples])
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    texts = [s.text for s in samples]
    scores = pointing_game(model, x, texts, masks, tokenizer, methods=("rollout", "grad_rollout"), shifts=2)
    baseline = scores["rollout"].baseline
    assert 0.03 < baseline < 0.1  # a small shape covers about 6% of the image
    # Measured 68% and 52% (baseline 5.6%). The gradient-weighted rollout follows the text; plain rollout is the
    # same for every text, so with two shapes it finds the named one about half the time.
    assert scores["grad_rollout"].accuracy > baseline + 0.40, scores
    assert scores["rollout"].accuracy > baseline + 0.25, scores
