"""Held-out evaluation (polymodal.tasks.evaluation, .embedding): the one embedding loop, which items count
as right answers to a caption, and the retrieval grid drawing exactly those as right."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.datasets import ShapesDataset
from polymodal.tasks import (
    EmbeddedData,
    caption_matches,
    embed_dataset,
    plot_retrieval_examples,
    retrieval_metrics,
    retrieval_verdicts,
    zero_shot_on_labels,
)
from polymodal.tasks.plots import CORRECT_COLOR, INCORRECT_COLOR


def test_without_mentions_identical_captions_match_each_other():
    meta = [{"caption": c} for c in ["a red circle", "a blue star", "a red circle", "a red ring"]]
    same = [[0, 2], [1], [0, 2], [3]]
    assert caption_matches(meta) == (same, same)
    # without captions only the pair itself counts
    assert caption_matches([{"index": 0}, {"index": 1}]) == ([[0], [1]], [[0], [1]])


def test_an_item_fits_every_caption_whose_stated_attributes_it_has():
    meta = [
        {"shape": "circle", "colour": "red", "size": "small", "mentions": ["shape", "colour"]},
        {"shape": "circle", "colour": "red", "size": "large", "mentions": ["shape", "colour", "size"]},
        {"shape": "circle", "colour": "blue", "size": "small", "mentions": ["colour"]},
        {"shape": "star", "colour": "red", "size": "small", "mentions": ["shape", "colour", "size"]},
    ]
    text_to_item, item_to_text = caption_matches(meta)
    # a naive reference: item j fits caption i iff it agrees on every attribute caption i states
    for i, q in enumerate(meta):
        expected = [j for j, m in enumerate(meta) if all(m[a] == q[a] for a in q["mentions"])]
        assert text_to_item[i] == expected
    assert text_to_item == [[0, 1], [1], [2], [3]]
    assert item_to_text == [[0], [0, 1], [2], [3]]


def test_heldout_shapes_are_matched_by_what_their_captions_say():
    meta = [ShapesDataset("heldout", 300, seed=0)[i]["meta"] for i in range(300)]
    text_to_item, item_to_text = caption_matches(meta)
    for i, m in enumerate(meta):
        assert i in text_to_item[i] and i in item_to_text[i]
        for j in text_to_item[i]:
            for attr in m["mentions"]:
                assert meta[j][attr] == m[attr] and str(m[attr]) in m["caption"]
    # the short captions ("a red circle") are answered by every image of that colour and shape
    short = next(i for i, m in enumerate(meta) if m["mentions"] == ["shape", "colour"])
    same = [j for j, m in enumerate(meta) if (m["shape"], m["colour"]) == (meta[short]["shape"], meta[short]["colour"])]
    assert text_to_item[short] == same


def test_duplicate_captions_do_not_count_as_misses():
    """Two images fit "a red circle" equally; a one-to-one relevance would call one of the two
    queries a miss at R@1 by a coin flip, counting every fitting image as right does not."""
    captions = ["a red circle", "a red circle", "a blue star", "a green ring"]
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    image = text.clone()
    image[1] += 1e-3  # image 1 scores a hair higher than image 0 for both "a red circle" queries
    text_to_item, _ = caption_matches([{"caption": c} for c in captions])
    assert retrieval_metrics(text, image, torch.arange(4), ks=(1,))["R@1"] == 0.75
    assert retrieval_metrics(text, image, text_to_item, ks=(1,))["R@1"] == 1.0


# ------------------------------------------------------------------------------------ the embedding loop


class TwoTowers(nn.Module):
    """encode_image / encode_text as plain linear maps, with dropout so eval mode changes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.drop = nn.Dropout(0.5)

    def encode_image(self, x, normalize=False):
        out = self.drop(self.image(x))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, x, normalize=False):
        out = self.drop(self.text(x))
        return F.normalize(out, dim=-1) if normalize else out


def test_embed_dataset_equals_embedding_everything_at_once_and_restores_modes():
    torch.manual_seed(0)
    model = TwoTowers()
    model.train()
    model.text.eval()  # a submodule the caller left in eval mode stays so
    images, texts = torch.randn(10, 6), torch.randn(10, 5)
    batches = [
        {
            "inputs": {"image": images[s : s + 4], "text": texts[s : s + 4]},
            "meta": [{"i": i} for i in range(s, min(s + 4, 10))],
        }
        for s in range(0, 10, 4)
    ]
    batches.insert(1, {"inputs": {"image": images[:0], "text": texts[:0]}, "meta": []})  # an all-skipped batch
    data = embed_dataset(model, batches, ("image", "text"))
    with torch.no_grad():
        model.eval()
        expected_image = F.normalize(model.image(images), dim=-1)
        expected_text = F.normalize(model.text(texts), dim=-1)
    model.train()
    model.text.eval()
    torch.testing.assert_close(data.embeddings["image"], expected_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(data.embeddings["text"], expected_text, rtol=0, atol=1e-6)
    assert [m["i"] for m in data.meta] == list(range(10)) and data.labels is None
    assert model.training and model.image.training and model.drop.training and not model.text.training
    assert not data.embeddings["image"].requires_grad

    # (inputs, labels) pairs through any encode callable, e.g. a classifier's logits
    pairs = [(images[:6], torch.arange(6)), (images[6:], torch.arange(6, 10))]
    data = embed_dataset(model, pairs, encode=model.image)
    with torch.no_grad():
        torch.testing.assert_close(data.features, model.image(images))
    assert data.labels.tolist() == list(range(10)) and len(data) == 10
    assert model.drop.training


def test_embed_dataset_errors_name_the_problem():
    model = TwoTowers()
    with pytest.raises(ValueError, match="has no encode_audio"):
        embed_dataset(model, [], "audio")
    with pytest.raises(ValueError, match="either modalities"):
        embed_dataset(model, [], "image", encode=model.image)
    with pytest.raises(ValueError, match="inputs have no 'text'"):
        embed_dataset(model, [{"inputs": {"image": torch.randn(2, 6)}, "meta": [{}, {}]}], ("image", "text"))
    with pytest.raises(ValueError, match=r"batch 0: features came out as \(2, 4, 1\)"):
        embed_dataset(model, [(torch.randn(2, 6), torch.zeros(2))], encode=lambda x: model.image(x)[..., None])
    with pytest.raises(ValueError, match="NaN or infinite"):
        embed_dataset(model, [(torch.full((2, 6), float("nan")), torch.zeros(2))], "image", require_finite=True)
    assert len(embed_dataset(model, [], "image")) == 0


# ------------------------------------------------------------------------ the grid uses the metric's relevance


BLUE = (40, 90, 200)


def grid_meta() -> list[dict]:
    """Four red triangles of different sizes and four blue rings, two of them small."""
    meta = []
    for i, size in enumerate(["small", "large", "small", "large"]):
        mentions = ["shape", "colour"] if i == 0 else ["shape", "colour", "size"]
        meta.append(
            {"caption": f"red triangle {i}", "shape": "triangle", "colour": "red", "size": size, "mentions": mentions}
        )
    for i, size in enumerate(["small", "small", "large", "large"]):
        mentions = ["shape", "colour", "size"] if i == 0 else ["shape", "colour"]
        meta.append(
            {
                "caption": f"blue ring {i}",
                "shape": "ring",
                "colour": "blue",
                "size": size,
                "mentions": json.dumps(mentions),
            }
        )  # as index files store it
    return meta


def test_retrieval_grid_frames_exactly_the_items_the_metric_counts_as_right(tmp_path):
    from tests.tasks.test_plots import _runs, open_png

    meta = grid_meta()
    torch.manual_seed(3)
    image = torch.eye(8, 16)
    text = F.normalize(torch.randn(8, 16), dim=-1)
    # "red triangle 0" (any red triangle) is nearest the other red triangles, then a ring, then itself;
    # "blue ring 0" (small blue rings only) is nearest the large rings, then the small ones.
    text[0] = F.normalize(3 * image[1] + 2.5 * image[2] + 2 * image[5] + 1 * image[0], dim=-1)
    text[4] = F.normalize(3 * image[6] + 2.5 * image[7] + 2 * image[4] + 1.5 * image[5], dim=-1)
    data = EmbeddedData({"image": image, "text": text}, meta=meta)
    blue = torch.tensor(BLUE, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
    shown = plot_retrieval_examples(
        data, lambda positions: [blue] * len(positions), tmp_path / "grid.png", num_queries=2, k=4
    )

    # naively: item j is right for caption q when it has every attribute caption q states
    def fits(q, j):
        said = meta[q]["mentions"] if isinstance(meta[q]["mentions"], list) else json.loads(meta[q]["mentions"])
        return all(meta[j][a] == meta[q][a] for a in said)

    assert shown.queries == [0, 4]
    top = (text[[0, 4]] @ image.T).topk(4, dim=-1).indices
    assert torch.equal(shown.indices, top)
    expected = torch.tensor([[fits(q, int(j)) for j in row] for q, row in zip([0, 4], top)])
    assert torch.equal(shown.correct, expected)
    assert expected.tolist() == [[True, True, False, True], [False, False, True, True]]
    # several right answers besides each query's own pair: a pair-only grid would frame them red
    assert int(expected[0].sum()) == 3 and 0 in top[0].tolist()

    pixels = open_png(shown.path).astype(int)
    is_blue = (np.abs(pixels - np.array(BLUE)) <= 2).all(-1)
    rows, cols = _runs(is_blue.any(axis=1)), _runs(is_blue.any(axis=0))
    assert len(rows) == 2 and len(cols) == 4, (rows, cols)
    for q, (y0, y1) in enumerate(rows):
        for j, (x0, _) in enumerate(cols):
            colour = CORRECT_COLOR if expected[q, j] else INCORRECT_COLOR
            assert np.abs(pixels[(y0 + y1) // 2, x0 - 2] - np.array(colour)).max() <= 3, (q, j)


def test_retrieval_verdicts():
    assert retrieval_verdicts(torch.tensor([[2, 0, 1], [1, 2, 0]]), [[0, 2], {1}]).tolist() == [
        [True, True, False],
        [True, False, False],
    ]
    with pytest.raises(ValueError, match=r"\(Q, k\) for 3 queries"):
        retrieval_verdicts(torch.tensor([[0]]), [[0], [0], [0]])


def test_zero_shot_on_labels_refuses_labels_that_are_not_classes():
    model = TwoTowers()

    def tokenizer(texts):
        return torch.tensor([[ord(c) / 100 for c in t.ljust(5)[:5]] for t in texts])

    emb = F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(
        ValueError, match=r"index.csv holds labels that are not among the 2 class names: \['dog', 'fox'\]"
    ):
        zero_shot_on_labels(model, tokenizer, emb, ["cat", "dog", "fox"], ["cat", "cow"], ["{}"], where="index.csv")
    result = zero_shot_on_labels(model, tokenizer, emb, ["cat", "cow", "cat"], ["cat", "cow"], ["a {}"])
    with torch.no_grad():
        model.eval()
        weights = F.normalize(model.encode_text(tokenizer(["a cat", "a cow"]), normalize=True), dim=-1)
    predicted = (emb @ weights.T).argmax(1).tolist()
    truth = [0, 1, 0]
    assert result.top1 == pytest.approx(sum(p == t for p, t in zip(predicted, truth)) / 3)
    assert result.num_samples == 3 and set(result.per_class) == {"cat", "cow"}


class LookupText(nn.Module):
    """A text tower that gives each known sentence a fixed random vector (and counts its calls)."""

    def __init__(self, sentences: list[str], dim: int = 8) -> None:
        super().__init__()
        self.ids = {s: i for i, s in enumerate(sentences)}
        self.table = nn.Parameter(torch.randn(len(sentences), dim, generator=torch.Generator().manual_seed(0)))
        self.calls = 0

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.ids[t]] for t in texts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.calls += 1
        out = self.table[tokens[:, 0]]
        return F.normalize(out, dim=-1) if normalize else out


def test_caption_choice_metrics_equal_a_per_sample_reference():
    from polymodal.tasks import caption_choice_metrics, format_metrics

    n = 50
    rng = np.random.default_rng(0)
    meta = []
    for i in range(n):
        m = {"caption": f"c{i}", "unseen": bool(i % 3 == 0), "layout": ("horizontal", "size")[i % 2]}
        if i % 5:  # some samples have no wrong captions, one has them as JSON text, one is damaged
            m["wrong_captions"] = {"swap": f"s{i}", "colours": f"k{i}"} if i % 7 else json.dumps({"swap": f"s{i}"})
        meta.append(m)
    meta[1]["wrong_captions"] = "not json"
    sentences = [f"{p}{i}" for p in "csk" for i in range(n)]
    model = LookupText(sentences)
    items = torch.from_numpy(rng.standard_normal((n, 8))).float()
    captions = model.table.detach()[:n] * 3.0  # not unit length: the metric uses cosines

    metrics = caption_choice_metrics(model, model.tokenize, items, captions, meta, "unseen", batch_size=7)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a, b, dim=0))

    for kind, prefix in (("swap", "s"), ("colours", "k")):
        wins = {"all": [], "seen": [], "unseen": [], "horizontal": [], "size": []}
        for i, m in enumerate(meta):
            raw = m.get("wrong_captions")
            wrong = json.loads(raw) if isinstance(raw, str) and raw.startswith("{") else raw
            if not isinstance(wrong, dict) or kind not in wrong:
                continue
            win = cos(items[i], captions[i]) > cos(items[i], model.table.detach()[sentences.index(f"{prefix}{i}")])
            wins["all"].append(win)
            wins["unseen" if m["unseen"] else "seen"].append(win)
            wins[m["layout"]].append(win)
        assert metrics[f"choice/{kind}/top1"] == pytest.approx(np.mean(wins["all"]), abs=1e-9)
        assert metrics[f"choice/{kind}/seen_top1"] == pytest.approx(np.mean(wins["seen"]), abs=1e-9)
        assert metrics[f"choice/{kind}/unseen_top1"] == pytest.approx(np.mean(wins["unseen"]), abs=1e-9)
        for layout in ("horizontal", "size"):
            assert metrics[f"choice/{kind}/{layout}_top1"] == pytest.approx(np.mean(wins[layout]), abs=1e-9)
        assert f"choice/{kind}/vertical_top1" not in metrics  # no sample has it
    assert any("own caption over its swap" in line and "horizontal" in line for line in format_metrics(metrics))
    # the item's own caption as its wrong one ties, and a tie is not a win
    tie = caption_choice_metrics(
        model,
        model.tokenize,
        items[:2],
        model.table.detach()[:2],
        [{"wrong_captions": {"x": "c0"}}, {"wrong_captions": {"x": "c1"}}],
    )
    assert tie == {"choice/x/top1": 0.0}
    assert caption_choice_metrics(model, model.tokenize, items, captions, [{"caption": "c"}] * n) == {}
