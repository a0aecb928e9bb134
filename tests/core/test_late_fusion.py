import pytest
import torch

from polymodal import ComponentConfig, LateFusionClassifier, ModelConfig, build_model, from_pretrained
from polymodal.encoders import TextTransformer, VisionTransformer
from polymodal.fusion import ConcatFusion, CrossAttentionFusion
from tests.helpers import assert_all_params_get_grad


def towers(output_dim=16):
    return {
        "image": VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=output_dim),
        "text": TextTransformer(vocab_size=100, context_length=8, width=32, layers=1, heads=2, output_dim=output_dim),
    }


def inputs():
    return {"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 100, (4, 8))}


def test_concat_fusion_classifier_learns():
    model = LateFusionClassifier(towers(), ConcatFusion({"image": 16, "text": 16}, output_dim=24), head=5)
    out = model(**inputs())
    assert out.logits.shape == (4, 5) and out.fused.shape == (4, 24)
    assert_all_params_get_grad(model, out.logits.logsumexp(-1).sum() - out.logits[:, 0].sum())


def test_cross_attention_fusion_uses_tokens():
    fusion = CrossAttentionFusion(
        "image", "text", dim=32, heads=2, layers=1, input_dims={"image": 32, "text": 32}, output_dim=20
    )
    # token fusion reads forward_features, so the towers need no pooled projection
    model = LateFusionClassifier(towers(output_dim=None), fusion, head=3)
    out = model(**inputs())
    assert out.logits.shape == (4, 3)
    assert_all_params_get_grad(model, out.logits.square().sum())


def test_missing_input_is_named():
    model = LateFusionClassifier(towers(), ConcatFusion({"image": 16, "text": 16}), head=2)
    with pytest.raises(ValueError, match=r"missing inputs \['text'\]"):
        model(image=torch.randn(1, 3, 32, 32))


def test_from_config_and_round_trip(tmp_path):
    cfg = ModelConfig(
        name="fusion-test",
        kind="late_fusion",
        num_classes=3,
        towers={
            "image": ComponentConfig(
                "vit", dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=16)
            ),
            "text": ComponentConfig(
                "text_transformer",
                dict(vocab_size=100, context_length=8, width=32, layers=1, heads=2, output_dim=16),
            ),
        },
        fusion=ComponentConfig("concat", {"input_dims": {"image": 16, "text": 16}, "output_dim": 8}),
    )
    model = build_model(cfg).eval()
    x = inputs()
    model.save_pretrained(tmp_path / "clf")
    again = from_pretrained(tmp_path / "clf").eval()
    assert isinstance(again, LateFusionClassifier)
    torch.testing.assert_close(again(**x).logits, model(**x).logits, rtol=0, atol=0)


def padded_text(extra: int = 0) -> torch.Tensor:
    """CLIP-style ids (start, words, end of text = the highest id) with zero padding, ``extra`` more of it."""
    text = torch.zeros(4, 8 + extra, dtype=torch.long)
    for i, n in enumerate((2, 3, 5, 6)):
        text[i, 0] = 98
        text[i, 1 : n + 1] = torch.randint(1, 90, (n,), generator=torch.Generator().manual_seed(i))
        text[i, n + 1] = 99
    return text


@pytest.mark.parametrize(
    "query, context, bidirectional",
    [("image", "text", False), ("text", "image", False), ("image", "text", True)],
)
def test_cross_attention_fusion_ignores_text_padding(query, context, bidirectional):
    """The classifier passes the text tower's padding mask to token fusion: padding is neither attended
    to nor pooled, so more of it leaves the logits unchanged."""
    cfg = ModelConfig(
        name="token-fusion",
        kind="late_fusion",
        num_classes=3,
        towers={
            "image": ComponentConfig("vit", dict(image_size=32, patch_size=8, width=32, layers=1, heads=2)),
            "text": ComponentConfig(
                "text_transformer",
                dict(vocab_size=100, context_length=16, width=32, layers=1, heads=2, output_dim=None),
            ),
        },
        fusion=ComponentConfig(
            "cross_attention",
            dict(
                query_modality=query,
                context_modality=context,
                dim=32,
                heads=2,
                layers=2,
                bidirectional=bidirectional,
                input_dims={"image": 32, "text": 32},
            ),
        ),
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        short = model(image=image, text=padded_text()).logits
        long = model(image=image, text=padded_text(extra=8)).logits
        # the padded positions do carry features, so without the mask the logits would move
        unmasked = model.fusion(
            {
                "image": model.towers["image"].forward_features(image),
                "text": model.towers["text"].forward_features(padded_text(extra=8)),
            }
        )
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.head(unmasked.pooled), short, atol=1e-4)
