"""open_clip's CoCa, with random weights built here, imports as a polymodal captioner with the same outputs.

Each model is saved as an open_clip directory (``open_clip_config.json`` with its ``model_cfg``, and
``open_clip_model.safetensors``), which ``open_clip.create_model("local-dir:...")`` reads back as the
reference and ``polymodal.from_pretrained`` imports. Compared: the contrastive image and text embeddings,
the teacher-forced decoder logits, and greedy captions token for token.

The installed open_clip 3.3 cannot generate with transformers 5 (its CoCa module imports
``BeamSearchScorer``, which transformers 5 removed, and then refuses to generate at all), so the
``open_clip_generate`` fixture gives it back the logits processors its ``top_k`` path uses, all of which
transformers 5 still has.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import open_clip.coca_model as coca_model
import pytest
import torch
import transformers
from safetensors.torch import save_file

import polymodal
from polymodal.checkpoint import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, CheckpointError
from polymodal.convert import config_from_open_clip
from polymodal.tasks.captioning import MultimodalTextDecoder, caption_target_mask
from tests.core.test_open_clip_parity import perturbed
from tests.helpers import one_thread  # noqa: F401 (an autouse fixture)

SOT, EOT = 49406, 49407
ATOL = 1e-4

# a small CoCa unlike the default: other widths (pooler 48 wide over 64-wide tokens), heads and depths,
# 16 pooler queries, QuickGELU, a short context
SMALL = {
    "embed_dim": 48,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "head_width": 16,
        "attentional_pool": True,
        "attn_pooler_queries": 16,
        "attn_pooler_heads": 4,
        "output_tokens": True,
    },
    "text_cfg": {"context_length": 12, "width": 48, "heads": 3, "layers": 2, "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 12, "width": 48, "heads": 6, "layers": 2, "attn_pooler_heads": 3},
    "custom_text": True,
}
POOLER = ("attentional_pool", "attn_pooler_queries", "attn_pooler_heads")
VARIANTS = {
    "small": SMALL,
    # the pooler as wide as the tokens: nn.MultiheadAttention then keeps one fused in-projection
    "pooler_as_wide_as_tokens": {**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "width": 48, "head_width": 12}},
    # coca_base's layout: no attentional pooler, so the class token is pooled and the decoder reads the patches
    "no_pooler": {
        **SMALL,
        "embed_dim": 32,
        "vision_cfg": {k: v for k, v in SMALL["vision_cfg"].items() if k not in POOLER} | {"width": 48},
    },
}


@pytest.fixture
def open_clip_generate(monkeypatch):
    """open_clip's CoCa.generate with the transformers 5 pieces its top_k path needs (see the module docstring)."""
    for name in (
        "LogitsProcessorList",
        "MinLengthLogitsProcessor",
        "RepetitionPenaltyLogitsProcessor",
        "MaxLengthCriteria",
        "StoppingCriteriaList",
    ):
        monkeypatch.setattr(coca_model, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(coca_model, "GENERATION_TYPES", {"top_k": transformers.TopKLogitsWarper})
    monkeypatch.setattr(coca_model, "_has_transformers", True)


def write_coca_dir(cfg: dict, directory: Path, eos_scale: float = 1.0) -> torch.nn.Module:
    """A perturbed random CoCa saved as an open_clip directory; returns open_clip's model read back from it.

    ``eos_scale`` scales the decoder's end-of-text output column, so that greedy captions end at
    different steps (with random weights they would all run to the length limit).
    """
    torch.manual_seed(0)
    ref = coca_model.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
    head = ref.text_decoder.text_projection  # (width, vocab): open_clip 3.3 leaves it uninitialised (torch.empty)
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(4)) * head.shape[0] ** -0.5)
        head[:, EOT] *= eos_scale
    perturbed(ref)
    directory.mkdir()
    (directory / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(directory / OPEN_CLIP_WEIGHTS))
    return open_clip.create_model(f"local-dir:{directory}").eval()


def captions(rows: int, context_length: int, lengths: tuple[int, ...] = (3, 7, 11)) -> torch.Tensor:
    """Tokenized-looking captions: start, random words, end, padding (one row fills the whole context)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(rows, context_length, dtype=torch.long)
    for r in range(rows):
        n = min(lengths[r % len(lengths)], context_length - 1)
        ids[r, 0], ids[r, 1:n], ids[r, n] = SOT, torch.randint(1, SOT, (n - 1,), generator=g), EOT
    return ids


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def assert_same_outputs(model, ref, image: torch.Tensor, text: torch.Tensor) -> None:
    """Embeddings (normalised or not), teacher-forced logits and targets, and the training forward's parts."""
    with torch.no_grad():
        for normalize in (True, False):
            torch.testing.assert_close(
                model.encode_image(image, normalize), ref.encode_image(image, normalize), rtol=0, atol=ATOL
            )
            torch.testing.assert_close(
                model.encode_text(text, normalize), ref.encode_text(text, normalize), rtol=0, atol=ATOL
            )
        expected = ref(image, text)  # teacher forcing: logits (B, L - 1, vocab) of labels text[:, 1:]
        states = model.towers["text"].forward_hidden(text)  # (B, L + 1, width)
        logits = model.decoder(states[:, : text.shape[1] - 1], model.image_tokens(image))
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=ATOL)
        out = model(image=image, text=text)  # the kept positions only, and the normalised embeddings
        keep = caption_target_mask(text, EOT, 0)
        torch.testing.assert_close(out.caption_logits, expected["logits"][keep], rtol=0, atol=ATOL)
        assert torch.equal(out.caption_targets, expected["labels"][keep])
        torch.testing.assert_close(out.embeddings["image"], expected["image_features"], rtol=0, atol=ATOL)
        torch.testing.assert_close(out.embeddings["text"], expected["text_features"], rtol=0, atol=ATOL)
        assert out.logit_scale.item() == pytest.approx(expected["logit_scale"].item())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_small_coca_embeddings_and_logits_match_open_clip(tmp_path, variant):
    cfg = VARIANTS[variant]
    ref = write_coca_dir(cfg, tmp_path / "oc")
    model = polymodal.from_pretrained(tmp_path / "oc").eval()
    assert isinstance(model, polymodal.CaptioningModel) and isinstance(model.decoder, MultimodalTextDecoder)
    image_args = model.config.towers["image"].args
    assert image_args["pool_type"] == ("cls" if variant == "no_pooler" else "queries")
    assert_same_outputs(model, ref, images(3, 32), captions(3, 12))


def test_greedy_captions_match_open_clip_token_for_token(tmp_path, open_clip_generate):
    """open_clip's greedy path (top_k=1) under its stopping rules: no end-of-text before min_seq_len tokens
    (counting the start token), and an end-of-text forced at seq_len; rows that end are padded."""
    ref = write_coca_dir(SMALL, tmp_path / "oc", eos_scale=10.0)
    model = polymodal.from_pretrained(tmp_path / "oc").eval()
    image = images(8, 32)
    with torch.no_grad():
        for seq_len, min_seq_len in ((12, 5), (9, 1)):
            expected = ref.generate(image, generation_type="top_k", top_k=1, seq_len=seq_len, min_seq_len=min_seq_len)
            assert torch.equal(expected[:, 0], torch.full((8,), SOT))
            options = {"max_length": seq_len - 1, "min_length": min_seq_len, "eos_at_max_length": True}
            ours = model.generate(image, **options)
            assert torch.equal(ours, expected[:, 1:]), (ours, expected)
            assert torch.equal(model.generate(image, use_cache=False, **options), ours)
        # the rules were exercised: captions end early and at the limit, and min_length moved some ends
        ends = (ours == EOT).int().argmax(dim=1)
        assert (ends < seq_len - 2).any() and (ends == seq_len - 2).any()
        free = model.generate(image, max_length=11)
        assert not torch.equal(free, model.generate(image, max_length=11, min_length=5))


def test_coca_vit_b_32_config_matches_open_clip(tmp_path, open_clip_generate):
    """open_clip's own coca_ViT-B-32 config, every width as it is, at 2 layers per tower and decoder
    (all 12 take 46 s to generate on 2 CPU cores), with open_clip's default generation: seq_len 30,
    min_seq_len 5."""
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "coca_ViT-B-32.json").read_text())
    for part in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        cfg[part]["layers"] = 2
    ref = write_coca_dir(cfg, tmp_path / "oc", eos_scale=4.0)
    model = polymodal.from_pretrained(tmp_path / "oc").eval()
    image_args = model.config.towers["image"].args
    assert image_args["pool_heads"] == 8 and "pool_queries" not in image_args  # 256: the ViT's default
    assert model.image_tokens(images(1, 224)).shape == (1, 255, 512)  # 256 pooler queries, the first pooled
    text = polymodal.get_tokenizer(model)(["a photo of a cat", "", "two dogs playing in the snow on a sunny day"])
    assert text.shape == (3, 76)
    assert_same_outputs(model, ref, images(3, 224), text)
    with torch.no_grad():
        expected = ref.generate(images(3, 224), generation_type="top_k", top_k=1)
        ours = model.generate(images(3, 224), max_length=29, min_length=5, eos_at_max_length=True)
    assert torch.equal(ours, expected[:, 1:]), (ours, expected)


# ------------------------------------------------------------------------------------------ refusals


def coca_cfg(vision=None, text=None, multimodal=None, **top) -> dict:
    return {
        **SMALL,
        **top,
        "vision_cfg": {**SMALL["vision_cfg"], **(vision or {})},
        "text_cfg": {**SMALL["text_cfg"], **(text or {})},
        "multimodal_cfg": {**SMALL["multimodal_cfg"], **(multimodal or {})},
    }


@pytest.mark.parametrize(
    "cfg, message",
    [
        (coca_cfg(multimodal={"ls_init_value": 0.1}), r"multimodal_cfg\.ls_init_value=0\.1 is not supported"),
        (coca_cfg(multimodal={"new_field": 1}), r"multimodal_cfg has fields \['new_field'\]"),
        (coca_cfg(vision={"attentional_pool": "parallel"}), r"vision_cfg\.attentional_pool='parallel'"),
        (coca_cfg(vision={"pool_type": "avg"}), r"vision_cfg\.pool_type='avg'"),
        (coca_cfg(text={"embed_cls": False}), r"text_cfg\.embed_cls=False"),
        (coca_cfg(text={"no_causal_mask": True}), r"text_cfg\.no_causal_mask=True"),
        (coca_cfg(text={"vocab_size": 1000}), r"text_cfg\.vocab_size=1000"),
        (coca_cfg(multimodal={"width": 96, "heads": 6}), r"multimodal_cfg\.width=96"),
        (coca_cfg(vision={"timm_model_name": "vit_tiny_patch16_224"}), r"vision_cfg\.timm_model_name"),
        (coca_cfg(pad_id=1), r"model_cfg has fields \['pad_id'\]"),
        # CoCa's parts without its decoder (a CLIP with open_clip's attentional pooler)
        ({"embed_dim": 48, "vision_cfg": SMALL["vision_cfg"]}, r"vision_cfg\.attentional_pool without multimodal_cfg"),
    ],
)
def test_coca_fields_polymodal_cannot_reproduce_are_refused_by_name(cfg, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_open_clip(cfg)


def test_refusal_reaches_the_user_through_from_pretrained(tmp_path):
    cfg = coca_cfg(multimodal={"ls_init_value": 0.1})
    write_coca_dir(cfg, tmp_path / "oc")
    with pytest.raises(CheckpointError, match=r"multimodal_cfg\.ls_init_value"):
        polymodal.from_pretrained(tmp_path / "oc")
