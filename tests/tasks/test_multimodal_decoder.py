"""CoCa's multimodal text decoder over a text tower's states, its captioner, and the generation length rules."""

from __future__ import annotations

import pytest
import torch

import polymodal
from polymodal import ModelConfig, from_pretrained
from polymodal.encoders import TextTransformer, VisionTransformer
from polymodal.fusion import ContrastiveAlignment, clip_loss
from polymodal.tasks.captioning import (
    ImageCaptioner,
    MultimodalTextDecoder,
    TextTowerDecoder,
    beam_search,
    caption_loss,
    caption_target_mask,
    greedy_search,
    sample,
)
from tests.helpers import (
    assert_all_params_get_grad,
    assert_checkpointing_matches,
    one_thread,  # noqa: F401 (an autouse fixture)
)

VOCAB, BOS, EOS, CONTEXT = 40, 38, 39, 8


def tiny_parts(decoder_width: int = 24) -> tuple[VisionTransformer, TextTransformer, MultimodalTextDecoder]:
    torch.manual_seed(0)
    image = VisionTransformer(
        image_size=16, patch_size=8, width=32, layers=1, heads=4, output_dim=16,
        pool_type="queries", pool_queries=5, pool_heads=2, pool_dim=24,
    )  # fmt: skip
    text = TextTransformer(
        vocab_size=VOCAB, context_length=CONTEXT, width=24, layers=1, heads=3, output_dim=16,
        class_token=True, pool_type="final_position",
    )  # fmt: skip
    decoder = MultimodalTextDecoder(
        VOCAB, CONTEXT, decoder_width, layers=2, heads=4, bos_token_id=BOS, eos_token_id=EOS
    )
    return image, text, decoder


def tiny_coca() -> ImageCaptioner:
    image, text, decoder = tiny_parts()
    return ImageCaptioner(image, decoder, text, ContrastiveAlignment({"image": 16, "text": 16}, 16))


def captions() -> torch.Tensor:
    # start, words, end, padding; the last row fills the context
    return torch.tensor(
        [
            [BOS, 5, 6, EOS, 0, 0, 0, 0],
            [BOS, 9, EOS, 0, 0, 0, 0, 0],
            [BOS, 3, 4, 5, 6, 7, 8, EOS],
        ]
    )


def test_decoder_shapes_and_teacher_forcing_keeps_the_caption_positions():
    model = tiny_coca().eval()
    image, text = torch.randn(3, 3, 16, 16), captions()
    memory = model.image_tokens(image)
    assert memory.shape == (3, 4, 24)  # 5 pooler queries, the first pooled
    states = model.towers["text"].forward_hidden(text)
    assert states.shape == (3, CONTEXT + 1, 24)  # the class token after the text
    full = model.decoder(states[:, : CONTEXT - 1], memory)
    assert full.shape == (3, CONTEXT - 1, VOCAB)
    logits, targets = model.teacher_forcing(text, memory)
    keep = caption_target_mask(text, EOS, 0)
    assert targets.tolist() == [5, 6, EOS, 9, EOS, 3, 4, 5, 6, 7, 8, EOS]
    torch.testing.assert_close(logits, full[keep], rtol=1e-5, atol=1e-6)
    out = model(image=image, text=text)
    torch.testing.assert_close(out.caption_logits, logits, rtol=1e-5, atol=1e-6)
    # one text tower pass served the decoder and the contrastive embedding
    torch.testing.assert_close(out.embeddings["text"], model.encode_text(text, normalize=True))
    torch.testing.assert_close(out.embeddings["image"], model.encode_image(image, normalize=True))


def test_decoder_is_causal_over_states_and_over_ids():
    model = tiny_coca().eval()
    memory = model.image_tokens(torch.randn(2, 3, 16, 16))
    states = torch.randn(2, 6, 24)
    changed = states.clone()
    changed[:, 4:] = torch.randn(2, 2, 24)
    a, b = model.decoder(states, memory), model.decoder(changed, memory)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    # ids through the text tower too, a later word turned into padding included (the tower masks padding)
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9], [BOS, 11, 12, 13, 14, 15]])
    later = ids.clone()
    later[:, 4] = torch.tensor([0, 21])
    decoding = model.caption_decoder
    a, b = decoding(ids, memory), decoding(later, memory)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    # and the image reaches every position
    other = decoding(ids, model.image_tokens(torch.randn(2, 3, 16, 16)))
    assert (other - a).abs().amin(dim=-1).gt(0).all()


def test_every_captioner_parameter_gets_a_gradient():
    model = tiny_coca().train()
    out = model(image=torch.randn(3, 3, 16, 16), text=captions())
    loss = caption_loss(out.caption_logits, out.caption_targets) + clip_loss(out.embeddings, out.logit_scale).loss
    assert_all_params_get_grad(model, loss)


def test_grad_checkpointing_is_exact():
    model = tiny_coca()
    image, text = torch.randn(3, 3, 16, 16), captions()
    assert_checkpointing_matches(model, lambda: model(image=image, text=text).caption_logits)


def test_step_by_step_cache_matches_the_whole_sequence():
    model = tiny_coca().eval()
    memory = model.image_tokens(torch.randn(2, 3, 16, 16))
    states = torch.randn(2, 7, 24)
    cache = model.decoder.init_cache(memory)
    parts = [model.decoder.step(states[:, :3], cache), model.decoder.step(states[:, 3:4], cache)]
    parts.append(model.decoder.step(states[:, 4:], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), model.decoder(states, memory), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[BOS, 5, 6, 7, 8], [BOS, 1, 2, 3, 4]])
    decoding, full = model.caption_decoder, model.caption_decoder(ids, memory)
    cache = decoding.init_cache(memory)
    steps = [decoding.step(ids[:, :1], cache)] + [decoding.step(ids[:, t : t + 1], cache) for t in range(1, 5)]
    assert cache.length == 5
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="covers 8 positions, got 4 states after 5 cached ones"):
        model.decoder.step(torch.randn(2, 4, 24), cache.decoder)


def test_generation_through_the_text_tower_with_and_without_cache():
    model = tiny_coca().eval()
    with torch.no_grad():
        model.decoder.head.weight[EOS] *= 4.0  # captions of different lengths
    image = torch.randn(4, 3, 16, 16)
    memory = model.image_tokens(image)
    decoding = model.caption_decoder
    assert isinstance(decoding, TextTowerDecoder) and decoding.context_length == CONTEXT
    for search in (
        lambda use_cache: greedy_search(decoding, memory, use_cache=use_cache),
        lambda use_cache: beam_search(decoding, memory, 3, use_cache=use_cache).tokens,
        lambda use_cache: sample(decoding, memory, generator=torch.Generator().manual_seed(0), use_cache=use_cache),
    ):
        assert torch.equal(search(True), search(False))
    ids = model.generate(image)
    assert ids.shape[0] == 4 and ids.shape[1] <= CONTEXT - 1
    assert torch.equal(ids, greedy_search(decoding, memory))


class RowPreferences:
    """A stub decoder whose next-token logits depend only on the row: even rows rank end-of-text first,
    odd rows last. Its output columns are tokenizer ids minus 10, as a decoder with ``token_ids`` maps them."""

    bos_token_id, eos_token_id, pad_token_id, num_tokens, context_length = 10, 15, 0, 6, 12

    def __init__(self, rows: int) -> None:
        self.table = torch.arange(6.0).repeat(rows, 1)  # column 5 (end-of-text) ranks first ...
        self.table[1::2, 5] = -1.0  # ... except in odd rows, where it ranks last

    def to_columns(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - 10

    def to_ids(self, columns: torch.Tensor) -> torch.Tensor:
        return columns + 10

    def _check_memory(self, image_tokens: torch.Tensor) -> None:
        pass

    def __call__(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        rows = image_tokens[:, 0, 0].long()  # which original row each running row is
        return self.table[rows][:, None, :].expand(-1, ids.shape[1], -1)


def test_min_length_and_eos_at_max_length():
    stub, memory = RowPreferences(4), torch.arange(4.0)[:, None, None]
    free = greedy_search(stub, memory, max_length=6, use_cache=False)
    assert free.tolist() == [[15] + [0] * 5, [14] * 6, [15] + [0] * 5, [14] * 6]
    ruled = greedy_search(stub, memory, max_length=6, use_cache=False, min_length=4, eos_at_max_length=True)
    # no end-of-text before the 4th token (the runner-up instead), and the 6th is one whatever the row prefers
    assert ruled.tolist() == [[14, 14, 14, 15, 0, 0], [14] * 5 + [15], [14, 14, 14, 15, 0, 0], [14] * 5 + [15]]
    drawn = sample(stub, memory, 6, top_k=1, use_cache=False, min_length=4, eos_at_max_length=True)
    assert torch.equal(drawn, ruled)
    beams = beam_search(stub, memory, 2, 6, use_cache=False, min_length=4, eos_at_max_length=True).beams
    first_end = (beams == 15).int().argmax(dim=-1)  # (4, 2)
    assert (beams == 15).any(dim=-1).all() and (first_end >= 3).all()
    assert (first_end[1::2] == 5).all()  # odd rows end only because they must
    with pytest.raises(ValueError, match=r"min_length must be an integer in \[0, 6\]"):
        greedy_search(stub, memory, max_length=6, min_length=7)


def test_parts_must_fit():
    image, text, decoder = tiny_parts()
    with pytest.raises(ValueError, match="reads the text tower's states; give a text encoder"):
        ImageCaptioner(image, decoder)
    alignment = ContrastiveAlignment({"image": 16, "text": 16}, 16)
    _, _, wide = tiny_parts(decoder_width=32)
    with pytest.raises(ValueError, match="tokens are 24 wide but the decoder expects memory_dim=32"):
        ImageCaptioner(image, wide, text, alignment)
    resnet = polymodal.encoders.ResNetEncoder(layers=[1, 1, 1, 1], width=8, heads=2, image_size=64, output_dim=16)
    with pytest.raises(ValueError, match="reads the tokens a ViT leaves beside its pooled feature"):
        ImageCaptioner(resnet, decoder, text, alignment)
    with pytest.raises(ValueError, match="cross-attends to image tokens of its own width 24; got memory_dim=32"):
        MultimodalTextDecoder(VOCAB, CONTEXT, 24, 1, 4, memory_dim=32, bos_token_id=BOS, eos_token_id=EOS)


def coca_config() -> ModelConfig:
    config = polymodal.get_model_config("coca-vit-tiny").to_dict()
    config["towers"]["image"]["args"].update(pool_type="queries", pool_queries=9, pool_heads=4, pool_dim=64)
    config["towers"]["text"]["args"].update(width=64, class_token=True, pool_type="final_position")
    config["decoder"] = {"type": "multimodal", "args": {"context_length": 32, "width": 64, "layers": 1, "heads": 4}}
    return ModelConfig.from_dict(config)


def test_a_multimodal_captioner_builds_from_its_config_and_round_trips(tmp_path):
    model = polymodal.build_model(coca_config()).eval()
    assert isinstance(model.decoder, MultimodalTextDecoder) and model.decoder.memory_dim == 64
    model.save_pretrained(tmp_path / "coca")
    again = from_pretrained(tmp_path / "coca").eval()
    assert again.config == model.config
    image = torch.randn(2, 3, 48, 48)
    text = polymodal.get_tokenizer(model)(["a red circle", "a blue square"])
    torch.testing.assert_close(
        again(image=image, text=text).caption_logits, model(image=image, text=text).caption_logits
    )
    assert torch.equal(model.generate(image, max_length=5), again.generate(image, max_length=5))
    bad = coca_config().to_dict()
    bad["decoder"]["args"]["tie_embeddings"] = True
    with pytest.raises(ValueError, match=r"decoder: MultimodalTextDecoder has no arguments \['tie_embeddings'\]"):
        polymodal.build_model(ModelConfig.from_dict(bad))


def test_the_caption_task_trains_and_evaluates_a_multimodal_captioner(tmp_path):
    """A few steps of ``task: caption`` on a saved multimodal captioner: the loss (caption + contrastive), the
    held-out loss through the text tower, and greedy and beam captions through ``caption_decoder``."""
    import json

    from polymodal.train import train

    config = coca_config()
    config.decoder.args["layers"] = 1
    polymodal.build_model(config).save_pretrained(tmp_path / "coca")
    threads = torch.get_num_threads()
    try:
        report = train(
            {
                "task": "caption",
                "run_dir": str(tmp_path / "run"),
                "steps": 3,
                "log_every": 1,
                "save_every": 0,
                "tensorboard": False,
                "progress": False,
                "threads": 1,
                "task_args": {"vocabulary": "model", "max_length": 6, "num_beams": 2},
                "model": {"name": str(tmp_path / "coca")},
                "data": {"source": "shapes", "train_size": 64, "eval_size": 8, "batch_size": 8, "num_workers": 0},
                "optim": {"lr": 1e-3, "warmup_steps": 1},
            }
        )
    finally:
        torch.set_num_threads(threads)  # the trainer sets it for the whole process
    assert 0 < report["eval"]["caption/heldout_loss"] < 20
    records = json.loads((tmp_path / "run" / "captions.json").read_text())
    assert len(records) == 8 and all(isinstance(r["greedy"], str) and isinstance(r["beam2"], str) for r in records)
