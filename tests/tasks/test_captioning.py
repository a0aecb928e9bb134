"""The caption decoder, the captioner models built from configs, and their checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polymodal
from polymodal import ModelConfig, create_model, from_pretrained
from polymodal.tasks.captioning import (
    CaptionDecoder,
    CaptionOutput,
    ImageCaptioner,
    caption_loss,
    caption_target_mask,
)
from polymodal.tasks.captioning.decoder import CLIP_BOS_ID, CLIP_EOS_ID
from tests.helpers import assert_all_params_get_grad, assert_checkpointing_matches

BOS, EOS = 30, 31


def tiny_decoder(**kwargs) -> CaptionDecoder:
    args = {"vocab_size": 32, "context_length": 10, "width": 32, "layers": 2, "heads": 4}
    return CaptionDecoder(**{**args, "bos_token_id": BOS, "eos_token_id": EOS, **kwargs})


def captions() -> torch.Tensor:
    # start, words, end, padding; row 1 holds id 0 as a real word before its end; row 2 has no end token
    return torch.tensor(
        [
            [BOS, 5, 6, 7, EOS, 0, 0, 0],
            [BOS, 0, 9, EOS, 0, 0, 0, 0],
            [BOS, 3, 4, 5, 6, 0, 0, 0],
        ]
    )


def test_target_mask_stops_at_end_of_text():
    keep = caption_target_mask(captions(), EOS, 0)
    assert keep.tolist() == [
        [True, True, True, True, False, False, False],  # 5 6 7 EOS
        [True, True, True, False, False, False, False],  # 0 9 EOS: the 0 before the end is a word
        [True, True, True, True, False, False, False],  # no end token: every non-padding target
    ]


def test_teacher_forcing_logits_targets_and_loss():
    decoder = tiny_decoder(memory_dim=24).eval()
    text, memory = captions(), torch.randn(3, 5, 24)
    logits, targets = decoder.teacher_forcing(text, memory)
    assert targets.tolist() == [5, 6, 7, EOS, 0, 9, EOS, 3, 4, 5, 6]
    # the kept logits are exactly those of the full forward pass at the kept positions
    full = decoder(text[:, :-1], memory)  # (3, 7, vocab)
    keep = caption_target_mask(text, EOS, 0)
    torch.testing.assert_close(logits, full[keep], rtol=1e-5, atol=1e-6)
    # more padding columns change nothing
    padded = F.pad(text, (0, 2), value=0)
    for a, b in zip(decoder.teacher_forcing(padded, memory), (logits, targets)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the loss is the mean negative log-likelihood of the targets
    nll = -torch.stack([full[keep][i].log_softmax(-1)[t] for i, t in enumerate(targets.tolist())]).mean()
    torch.testing.assert_close(caption_loss(logits, targets), nll)
    with pytest.raises(ValueError, match="no target tokens"):
        caption_loss(logits[:0], targets[:0])


def test_decoder_is_causal_and_reads_the_image():
    decoder = tiny_decoder().eval()
    text, memory = captions(), torch.randn(3, 5, 32)
    out = decoder(text, memory)
    changed = text.clone()
    changed[:, 4] = 11
    after = decoder(changed, memory)
    torch.testing.assert_close(after[:, :4], out[:, :4])  # earlier positions never see later tokens
    assert not torch.allclose(after[:, 4:], out[:, 4:])
    other = decoder(text, torch.randn(3, 5, 32))
    assert not torch.allclose(other, out)  # every position depends on the image tokens


@pytest.mark.parametrize("tie", [True, False])
def test_every_decoder_parameter_learns(tie):
    decoder = tiny_decoder(memory_dim=24, tie_embeddings=tie).train()
    assert (decoder.lm_head is None) == tie
    memory = torch.randn(3, 5, 24, requires_grad=True)
    loss = caption_loss(*decoder.teacher_forcing(captions(), memory))
    assert_all_params_get_grad(decoder, loss)
    assert memory.grad is not None and memory.grad.abs().sum() > 0


def test_decoder_grad_checkpointing_is_exact():
    decoder = tiny_decoder(drop=0.1)
    memory = torch.randn(3, 5, 32)
    assert_checkpointing_matches(decoder, lambda: decoder(captions(), memory))


def test_decoder_rejects_bad_input():
    decoder = tiny_decoder(memory_dim=24)
    memory = torch.randn(3, 5, 24)
    with pytest.raises(ValueError, match=r"\(B, N, 24\) image tokens"):
        decoder(captions(), torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="covers 10 positions, got 12 tokens"):
        decoder(torch.zeros(3, 12, dtype=torch.long), memory)
    with pytest.raises(ValueError, match=r"token ids in \[0, 32\)"):
        decoder(torch.full((3, 4), 40), memory)
    with pytest.raises(ValueError, match="integer tensor of token ids"):
        decoder(torch.zeros(3, 4), memory)
    with pytest.raises(ValueError, match="3 token rows but 2 images"):
        decoder(captions(), memory[:2])
    with pytest.raises(ValueError, match="must differ"):
        tiny_decoder(eos_token_id=BOS)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_decoder(bos_token_id=32)


def test_decoder_with_its_own_vocabulary_matches_the_full_one():
    # a decoder over 6 of the 32 ids, with the full decoder's weights: its logits are those columns
    full = tiny_decoder().eval()
    token_ids = [BOS, EOS, 5, 6, 7, 9]
    small = tiny_decoder(token_ids=token_ids).eval()
    state = full.state_dict()
    state["token_embedding.weight"] = state["token_embedding.weight"][token_ids]
    small.load_state_dict(state)
    assert small.num_tokens == 6 and small.token_embedding.weight.shape == (6, 32)
    assert set(small.state_dict()) == set(state)  # the lookup tables are rebuilt, not stored

    text = torch.tensor([[BOS, 5, 6, 7, EOS, 0, 0], [BOS, 9, EOS, 0, 0, 0, 0]])  # padding 0 is not in the list
    memory = torch.randn(2, 5, 32)
    logits, targets = small.teacher_forcing(text, memory)
    full_logits, full_targets = full.teacher_forcing(text, memory)
    torch.testing.assert_close(logits, full_logits[:, token_ids])
    assert [token_ids[c] for c in targets.tolist()] == full_targets.tolist()

    # greedy decoding picks the best of the 6 columns and reports tokenizer ids
    from polymodal.tasks.captioning import greedy_search

    out = greedy_search(small, memory, max_length=5)
    for b in range(2):
        seq = [BOS]
        while len(seq) <= 5 and seq[-1] != EOS:
            with torch.no_grad():
                scores = full(torch.tensor([seq]), memory[b : b + 1])[0, -1, token_ids]
            seq.append(token_ids[int(scores.argmax())])
        assert out[b, : len(seq) - 1].tolist() == seq[1:]

    with pytest.raises(ValueError, match=r"token ids \[11\] are not in this decoder's vocabulary of 6 tokens"):
        small.teacher_forcing(torch.tensor([[BOS, 5, 11, EOS]]), memory[:1])
    with pytest.raises(ValueError, match="must include the start- and end-of-text ids"):
        tiny_decoder(token_ids=[BOS, 5])
    with pytest.raises(ValueError, match="must not repeat"):
        tiny_decoder(token_ids=[BOS, EOS, 5, 5])


def test_clip_special_ids_and_decoding():
    tokenizer = polymodal.get_tokenizer("coca-vit-tiny")
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.pad_token_id) == (CLIP_BOS_ID, CLIP_EOS_ID, 0)
    ids = tokenizer(["a small red circle in the top left"])[0]
    assert tokenizer.decode(ids[1:]) == "a small red circle in the top left"  # generated ids come without the start


def test_shapes_references_and_vocabulary_cover_the_captions():
    # the held-out references (every template caption of an image's attributes) hold its own caption,
    # and every caption's tokens are in the vocabulary that task_args.vocabulary: data gives the decoder
    from polymodal.datasets.synthetic_shapes import caption_vocabulary, make_shape_sample, single_shape_captions

    tokenizer = polymodal.get_tokenizer("coca-vit-tiny")
    vocabulary = set(tokenizer.encode(" ".join(caption_vocabulary())))
    for split, share in (("heldout", 0.0), ("train", 0.0), ("train", 1.0)):
        for i in range(40):
            sample = make_shape_sample(i, split, image_size=16, antialias=False, two_shape_share=share)
            assert set(tokenizer.encode(sample.caption)) <= vocabulary, sample.caption
            if sample.attrs["num_shapes"] == 1:
                a = sample.attrs
                references = single_shape_captions(a["shape"], a["colour"], a["size"], a["position"])
                assert sample.caption in references and len(set(references)) == 12
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        single_shape_captions("blob", "red", "small", "top")


# ---------------------------------------------------------------------------------------- models


def caption_only_config() -> ModelConfig:
    config = polymodal.get_model_config("coca-vit-tiny").to_dict()
    del config["towers"]["text"]
    config["name"] = "caption-only"
    config["towers"]["image"]["args"].update(width=64, layers=1, output_dim=None)
    config["decoder"]["args"].update(width=32, layers=1)
    return ModelConfig.from_dict(config)


def test_coca_model_outputs_and_every_parameter_learns():
    model = create_model("coca-vit-tiny").train()
    assert isinstance(model, polymodal.CaptioningModel) and model.modalities == ["image", "text"]
    assert model.decoder.memory_dim == 128  # taken from the image tower
    tokenizer = polymodal.get_tokenizer(model)
    text = tokenizer(["a red circle", "a small blue square in the top left"])
    image = torch.randn(2, 3, 48, 48)
    out = model(image=image, text=text)
    assert isinstance(out, CaptionOutput)
    assert out.caption_logits.shape == (out.caption_targets.numel(), 49408)
    # every token after the start, up to and including the end of text (no word here is id 0)
    assert out.caption_targets.tolist() == [t for row in text.tolist() for t in row[1:] if t != 0]
    torch.testing.assert_close(out.embeddings["image"].norm(dim=-1), torch.ones(2))
    model.eval()
    out = model(image=image, text=text)
    # the image embedding pooled from the decoder's tokens equals the tower's own forward pass
    torch.testing.assert_close(out.embeddings["image"], model.encode_image(image, normalize=True))
    torch.testing.assert_close(out.embeddings["text"], model.encode_text(text, normalize=True))
    model.train()
    out = model(image=image, text=text)
    loss = (
        caption_loss(out.caption_logits, out.caption_targets)
        + polymodal.fusion.clip_loss(out.embeddings, out.logit_scale).loss
    )
    assert_all_params_get_grad(model, loss)


def test_save_and_load_round_trip(tmp_path):
    for name, model in (
        ("coca", create_model("coca-vit-tiny")),
        ("plain", polymodal.build_model(caption_only_config())),
    ):
        model.eval()
        model.save_pretrained(tmp_path / name)
        again = from_pretrained(tmp_path / name).eval()
        assert type(again) is type(model) and again.config == model.config
        state = again.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        image = torch.randn(3, 3, 48, 48)
        assert torch.equal(model.generate(image, max_length=6), again.generate(image, max_length=6))
    plain = from_pretrained(tmp_path / "plain")
    assert plain.modalities == ["image"] and plain.alignment is None
    assert "decoder.lm_head.weight" not in plain.state_dict()  # tied: the embedding is stored once
    with pytest.raises(ValueError, match="no text tower"):
        plain.encode_image(torch.randn(1, 3, 48, 48))
    out = plain(image=torch.randn(2, 3, 48, 48), text=polymodal.get_tokenizer(plain)(["a", "b c"]))
    assert out.embeddings == {} and out.logit_scale is None


def test_caption_with_tokenizer_and_generation_options():
    model = polymodal.build_model(caption_only_config()).eval()
    tokenizer = polymodal.get_tokenizer(model)
    image = torch.randn(2, 3, 48, 48)
    ids = model.generate(image, max_length=5)
    assert ids.shape[0] == 2 and ids.shape[1] <= 5
    assert model.caption(image, tokenizer, max_length=5) == [tokenizer.decode(row) for row in ids]
    beams = model.generate(image, num_beams=2, max_length=5)
    assert beams.shape[0] == 2 and beams.shape[1] <= 5


def test_config_validation():
    base = polymodal.get_model_config("coca-vit-tiny").to_dict()
    no_decoder = {**base, "decoder": None}
    with pytest.raises(ValueError, match="a captioner needs a decoder config and an image tower"):
        ModelConfig.from_dict(no_decoder)
    audio = {**base, "towers": {"audio": base["towers"]["image"], "text": base["towers"]["text"]}}
    with pytest.raises(ValueError, match="needs a decoder config and an image tower"):
        ModelConfig.from_dict(audio)
    clip = polymodal.get_model_config("clip-vit-tiny").to_dict()
    with pytest.raises(ValueError, match="only captioner models take a decoder"):
        ModelConfig.from_dict({**clip, "decoder": base["decoder"]})
    # the decoder's arguments are checked against its class when the model is built (the class lives in tasks)
    bad_arg = ModelConfig.from_dict({**base, "decoder": {"type": "transformer", "args": {"depth": 2}}})
    with pytest.raises(ValueError, match=r"decoder: CaptionDecoder has no arguments \['depth'\]"):
        polymodal.build_model(bad_arg)
    bad_type = {**base, "decoder": {"type": "lstm", "args": {}}}
    with pytest.raises(ValueError, match="decoder: unknown type 'lstm'"):
        ModelConfig.from_dict(bad_type)


def test_captioner_parts_must_fit():
    decoder = tiny_decoder(memory_dim=24)
    encoder = polymodal.encoders.VisionTransformer(image_size=16, patch_size=8, width=32, layers=1, heads=4)
    with pytest.raises(ValueError, match="tokens are 32 wide but the decoder expects memory_dim=24"):
        ImageCaptioner(encoder, decoder)
    with pytest.raises(ValueError, match="give both or neither"):
        ImageCaptioner(encoder, tiny_decoder(memory_dim=32), text_encoder=torch.nn.Identity())


# ---------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_short_training_run_learns_to_caption(tmp_path):
    """configs/caption.yaml cut to 150 steps of 64 images: the caption task learns colours and some shapes."""
    import json
    from pathlib import Path

    from polymodal.train import train

    recipe = Path(__file__).resolve().parents[2] / "configs" / "caption.yaml"
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "steps=150",
        "data.batch_size=64",
        "optim.warmup_steps=20",
        "save_every=0",
        "data.eval_size=200",
        "progress=false",
        "tensorboard=false",
        # one thread: on a busy 2-core machine two threads wait on each other (measured 13 vs 108 samples/s)
        "threads=1",
    ]
    threads = torch.get_num_threads()
    try:
        report = train(recipe, overrides)
    finally:
        torch.set_num_threads(threads)  # the trainer sets it for the whole process
    ev = report["eval"]
    print({k: round(v, 3) for k, v in ev.items()}, f"trained in {report['train_seconds']:.0f} s")
    # measured: greedy BLEU-4 0.58, CIDEr-D 2.24, right colour 100%, right shape 25%; beam BLEU-4 0.74
    assert ev["caption/greedy/right_colour"] >= 0.9
    assert ev["caption/greedy/bleu4"] >= 0.35
    assert ev["caption/beam3/bleu4"] >= 0.5
    assert ev["caption/greedy/cider"] >= 1.5

    # the run's outputs: captions of every held-out image, a figure, and a captioner that reloads
    run = tmp_path / "run"
    records = json.loads((run / "captions.json").read_text())
    assert len(records) == 200 and (run / "captions.png").is_file()
    model = from_pretrained(run).eval()
    assert model.decoder.num_tokens < 60  # vocabulary: data
    data = polymodal.datasets.ShapesDataset("heldout", n=200, seed=0, image_size=48)
    preprocess = polymodal.get_preprocess(model, "image")
    images = torch.stack([preprocess(data[i]["image"]) for i in range(200)])  # one batch, as the evaluation ran
    assert model.caption(images, polymodal.get_tokenizer(model)) == [r["greedy"] for r in records]
