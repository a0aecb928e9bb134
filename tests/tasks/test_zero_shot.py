"""Zero-shot classification: classifier weights, predictions, accuracy and evaluation over batches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polymodal
from polymodal.tasks.templates import (
    AUDIO_TEMPLATES,
    IMAGE_ENSEMBLE_TEMPLATES,
    SIMPLE_IMAGE_TEMPLATES,
    check_template,
    check_templates,
    fill_template,
    get_templates,
)
from polymodal.tasks.zero_shot import (
    ZeroShotClassifier,
    build_zero_shot_classifier,
    evaluate_zero_shot,
    meta_label_fn,
    zero_shot_accuracy,
)


class WordTokenizer:
    """Splits on spaces and gives each new word the next id; 0 pads to ``context_length``."""

    def __init__(self, context_length: int = 12) -> None:
        self.context_length = context_length
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class StubModel(nn.Module):
    """``encode_text``: mean of the word embeddings (then dropout); ``encode_image``: the input itself.

    The dropout makes any call in training mode visibly random, so results that match an eval-mode
    reference prove the model was switched to eval.
    """

    def __init__(self, dim: int = 16, vocab: int = 200) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(dim, dim)  # stands in for a tower a caller keeps in eval mode

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        mask = (tokens != 0).float()[..., None]  # (B, L, 1)
        x = self.drop((self.embed(tokens) * mask).sum(1) / mask.sum(1))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(x, dim=-1) if normalize else x


def naive_classifier(model, tokenizer, class_names, templates):
    model.eval()
    rows = []
    with torch.no_grad():
        for c in class_names:
            embs = [F.normalize(model.encode_text(tokenizer([fill_template(t, c)])), dim=-1)[0] for t in templates]
            rows.append(F.normalize(torch.stack(embs).mean(0), dim=0))
    return torch.stack(rows)


CLASSES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{}", "a blurry {} in the dark."]


# ------------------------------------------------------------------------------------------ templates


def test_builtin_template_sets():
    assert 4 <= len(SIMPLE_IMAGE_TEMPLATES) <= 6
    assert 40 <= len(IMAGE_ENSEMBLE_TEMPLATES) <= 80
    assert len(set(IMAGE_ENSEMBLE_TEMPLATES)) == len(IMAGE_ENSEMBLE_TEMPLATES)
    assert len(AUDIO_TEMPLATES) >= 8
    for t in (*SIMPLE_IMAGE_TEMPLATES, *IMAGE_ENSEMBLE_TEMPLATES, *AUDIO_TEMPLATES):
        assert t.count("{}") == 1 and t.count("{") == 1, t
        assert "zebra" in t.format("zebra")
    assert get_templates("audio") is AUDIO_TEMPLATES
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("video")


@pytest.mark.parametrize("bad", ["a photo", "a {} of a {}", "a {0}", "a {name}", "a {:>5}", "a {!r}", "a { photo"])
def test_template_without_exactly_one_placeholder_is_refused(bad):
    with pytest.raises(ValueError, match="template"):
        check_template(bad)


def test_literal_braces_and_callables_are_templates():
    check_template("a {{curly}} photo of a {}.")
    assert fill_template("a {{curly}} photo of a {}.", "cat") == "a {curly} photo of a cat."
    assert fill_template(lambda c: f"itap of a {c}.", "cat") == "itap of a cat."
    with pytest.raises(ValueError, match="non-empty string"):
        fill_template(lambda c: "  ", "cat")
    with pytest.raises(ValueError, match="templates is empty"):
        check_templates([])
    with pytest.raises(ValueError, match="list of templates"):
        check_templates("a photo of a {}.")
    with pytest.raises(ValueError, match=r"templates\[1\]"):
        check_templates(["a {}.", "no placeholder"])


# --------------------------------------------------------------------------- build_zero_shot_classifier


def test_classifier_matches_naive_loop_and_is_analytic():
    model, tok = StubModel(), WordTokenizer()
    model.train()
    model.frozen.eval()
    # batch_size 3 puts sentences of different classes in one batch and splits classes over batches.
    weights = build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES, batch_size=3)
    assert model.training and model.drop.training and not model.frozen.training  # every flag restored
    ref = naive_classifier(model, tok, CLASSES, TEMPLATES)
    torch.testing.assert_close(weights, ref, rtol=1e-5, atol=1e-6)
    assert weights.shape == (5, 16) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(5))

    # One bare template and one-word classes: each row is that word's embedding, normalised.
    single = build_zero_shot_classifier(model, tok, CLASSES, ["{}"])
    expected = F.normalize(model.embed.weight[[tok.vocab[c] for c in CLASSES]], dim=-1)
    torch.testing.assert_close(single, expected.detach())


def test_callable_templates_equal_string_templates():
    model, tok = StubModel(), WordTokenizer()
    a = build_zero_shot_classifier(model, tok, CLASSES, ["a photo of a {}.", lambda c: f"the {c} again"])
    b = build_zero_shot_classifier(model, tok, CLASSES, ["a photo of a {}.", "the {} again"])
    torch.testing.assert_close(a, b)


def test_classifier_restores_eval_mode_too():
    model, tok = StubModel(), WordTokenizer()
    model.eval()
    build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    "classes, templates, match",
    [
        ([], TEMPLATES, "class_names is empty"),
        (["cat", "dog", "cat"], TEMPLATES, r"duplicates \['cat'\]"),
        (["cat", ""], TEMPLATES, "non-empty strings"),
        ("cat", TEMPLATES, "list of strings"),
        (CLASSES, [], "templates is empty"),
        (CLASSES, ["a photo of a cat."], "exactly one"),
        (CLASSES, ["a {} and a {}."], "exactly one"),
    ],
)
def test_build_errors(classes, templates, match):
    with pytest.raises(ValueError, match=match):
        build_zero_shot_classifier(StubModel(), WordTokenizer(), classes, templates)


def test_model_without_text_tower_is_refused():
    with pytest.raises(ValueError, match="encode_text"):
        build_zero_shot_classifier(nn.Linear(2, 2), WordTokenizer(), CLASSES, TEMPLATES)


@pytest.fixture(scope="module")
def clip_tiny():
    torch.manual_seed(0)
    return polymodal.create_model("clip-vit-tiny"), polymodal.get_tokenizer("clip-vit-tiny")


def test_classifier_with_real_model_matches_naive_loop(clip_tiny):
    model, tokenizer = clip_tiny
    model.train()
    weights = build_zero_shot_classifier(model, tokenizer, ["cat", "dog", "airplane"], SIMPLE_IMAGE_TEMPLATES, 4)
    assert model.training
    ref = naive_classifier(model, tokenizer, ["cat", "dog", "airplane"], SIMPLE_IMAGE_TEMPLATES)
    model.train()
    torch.testing.assert_close(weights, ref, rtol=1e-5, atol=1e-5)
    assert weights.shape == (3, model.alignment.embed_dim)


def test_zero_shot_classifier_on_real_model(clip_tiny):
    model, tokenizer = clip_tiny
    clf = ZeroShotClassifier(model, tokenizer, ["cat", "dog", "airplane"], SIMPLE_IMAGE_TEMPLATES[:2])
    assert clf.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # the model's own temperature
    images = torch.randn(3, 3, 48, 48)
    logits = clf.logits(images)
    emb = model.eval().encode_image(images, normalize=True)
    torch.testing.assert_close(logits, emb @ clf.weights.T / 0.07, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clf.classify_embeddings(emb), logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ ZeroShotClassifier


def _stub_with(scale=None, bias=None):
    model = StubModel(dim=3)
    if scale is not None:
        model.alignment = SimpleNamespace(scale=lambda: torch.tensor(scale), logit_bias=bias)
    return model


def test_predict_and_softmax_probabilities():
    weights = torch.eye(3)
    clf = ZeroShotClassifier.from_weights(_stub_with(), weights, ["a", "b", "c"])
    assert clf.logit_scale == 100.0  # no alignment on the model
    x = torch.tensor([[0.1, 2.0, 0.0], [3.0, 1.0, 0.5], [0.0, 0.2, 0.3]])
    torch.testing.assert_close(clf.logits(x), F.normalize(x, dim=-1) * 100)
    pred = clf.predict(x)
    assert pred.dtype == torch.long and pred.tolist() == [1, 0, 2]
    proba = clf.predict_proba(x)
    torch.testing.assert_close(proba.sum(-1), torch.ones(3))
    assert proba.argmax(-1).tolist() == [1, 0, 2]


def test_multi_label_uses_the_models_logit_bias_and_per_class_thresholds():
    clf = ZeroShotClassifier.from_weights(
        _stub_with(scale=10.0, bias=torch.tensor(-5.0)),
        torch.eye(3),
        ["a", "b", "c"],
        multi_label=True,
        thresholds=[0.5, 0.9, 0.1],
    )
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cos = F.normalize(x, dim=-1)
    proba = clf.predict_proba(x)
    torch.testing.assert_close(proba, torch.sigmoid(10 * cos - 5))
    # Row 0: sigmoid(10*0.707 - 5) = 0.89 for a and b; a passes 0.5, b misses 0.9; c = 0.0067 misses 0.1.
    assert clf.predict_multi(x).tolist() == [[True, False, False], [False, False, True]]
    assert clf.predict(x).shape == (2,)  # predict is top-1 whatever multi_label says
    assert clf.predict_multi(x).dtype == torch.bool


def test_multi_label_without_bias_centres_logits_and_explicit_bias_wins():
    model = _stub_with(scale=10.0, bias=None)
    x = torch.tensor([[1.0, 0.5, 0.0]])
    clf = ZeroShotClassifier.from_weights(model, torch.eye(3), ["a", "b", "c"], multi_label=True)
    logits = 10 * F.normalize(x, dim=-1)
    torch.testing.assert_close(clf.predict_proba(x), torch.sigmoid(logits - logits.mean()))
    biased = ZeroShotClassifier.from_weights(
        model, torch.eye(3), ["a", "b", "c"], multi_label=True, logit_bias=[-1, 0, 1]
    )
    torch.testing.assert_close(biased.predict_proba(x), torch.sigmoid(logits + torch.tensor([-1.0, 0.0, 1.0])))


def test_calibrate_fits_per_class_bias():
    torch.manual_seed(1)
    clf = ZeroShotClassifier.from_weights(_stub_with(), torch.eye(4), list("abcd"), multi_label=True)
    emb = F.normalize(torch.randn(400, 4), dim=-1)
    cuts = torch.tensor([0.2, -0.1, 0.5, 2.0])  # class d (cosine > 2) is never present
    targets = emb > cuts
    bias = clf.calibrate(emb, targets)
    assert torch.isfinite(bias).all()
    pred = clf.proba_from_logits(clf.classify_embeddings(emb)) >= 0.5
    agreement = (pred == targets).float().mean(0)
    assert (agreement[:3] > 0.95).all(), agreement
    assert not pred[:, 3].any()
    # With the logit slope fixed at the scale, the boundary sits near each class's cut.
    torch.testing.assert_close(-bias[:3] / 100, cuts[:3], atol=0.05, rtol=0)


def test_classifier_argument_errors():
    with pytest.raises(ValueError, match=r"\(2, D\) tensor"):
        ZeroShotClassifier.from_weights(StubModel(), torch.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match="encode_audio"):
        ZeroShotClassifier.from_weights(StubModel(), torch.eye(2), ["a", "b"], modality="audio")
    with pytest.raises(ValueError, match="one per class"):
        ZeroShotClassifier.from_weights(StubModel(dim=2), torch.eye(2), ["a", "b"], thresholds=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ZeroShotClassifier.from_weights(StubModel(dim=2), torch.eye(2), ["a", "b"], thresholds=1.5)
    clf = ZeroShotClassifier.from_weights(StubModel(dim=2), torch.eye(2), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        clf.classify_embeddings(torch.randn(4, 3))


# ------------------------------------------------------------------------------------ accuracy / eval


def _scores_with_ranks(ranks: list[int], num_classes: int, labels: list[int]) -> torch.Tensor:
    """Rows whose true class lands at exactly the given 1-based rank (distinct scores, no ties)."""
    rows = []
    for r, y in zip(ranks, labels):
        others = [c for c in range(num_classes) if c != y]
        order = others[: r - 1] + [y] + others[r - 1 :]  # classes best first
        row = torch.empty(num_classes)
        row[order] = torch.linspace(1.0, 0.1, num_classes)
        rows.append(row)
    return torch.stack(rows)


def test_zero_shot_accuracy_known_answer():
    num_classes = 8
    ranks = [1, 1, 2, 5, 6, 8, 1, 3, 4, 7]
    labels = [0, 3, 7, 1, 2, 5, 6, 4, 0, 2]
    emb = _scores_with_ranks(ranks, num_classes, labels)  # with identity weights the scores are the embeddings
    out = zero_shot_accuracy(emb, torch.tensor(labels), torch.eye(num_classes), top_k=(1, 5, 3), chunk_size=3)
    assert out == pytest.approx({"top1": 0.3, "top3": 0.5, "top5": 0.7})
    assert list(out) == ["top1", "top3", "top5"]
    # k beyond the number of classes always hits.
    assert zero_shot_accuracy(emb, torch.tensor(labels), torch.eye(num_classes), top_k=(20,))["top20"] == 1.0


def test_zero_shot_accuracy_counts_ties_against_the_sample():
    emb = torch.ones(4, 3)  # every class scores the same
    out = zero_shot_accuracy(emb, torch.tensor([0, 1, 2, 0]), torch.eye(3), top_k=(1, 2, 3))
    assert out == {"top1": 0.0, "top2": 0.0, "top3": 1.0}


def test_zero_shot_accuracy_errors():
    with pytest.raises(ValueError, match="share D"):
        zero_shot_accuracy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.eye(4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        zero_shot_accuracy(torch.randn(2, 3), torch.tensor([0, 3]), torch.eye(3))
    with pytest.raises(ValueError, match="integer class indices"):
        zero_shot_accuracy(torch.randn(2, 3), torch.tensor([0.0, 1.0]), torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        zero_shot_accuracy(torch.full((2, 3), math.nan), torch.tensor([0, 1]), torch.eye(3))


def test_evaluate_zero_shot_matches_accuracy_and_builds_confusion():
    num_classes = 5
    ranks = [1, 2, 1, 1, 5, 3, 1, 1, 2]
    labels = [0, 0, 1, 2, 3, 3, 4, 4, 4]
    emb = _scores_with_ranks(ranks, num_classes, labels)
    batches = [(emb[i : i + 4], torch.tensor(labels[i : i + 4])) for i in range(0, len(labels), 4)]
    model = StubModel(dim=num_classes).train()
    clf = ZeroShotClassifier.from_weights(model, torch.eye(num_classes), list("abcde"))
    result = evaluate_zero_shot(model, batches, clf, progress=False)
    assert model.training
    assert result.num_samples == 9
    ref = zero_shot_accuracy(emb, torch.tensor(labels), torch.eye(num_classes))
    assert result.top1 == pytest.approx(ref["top1"]) and result.top5 == pytest.approx(ref["top5"])
    assert result.top1 == pytest.approx(5 / 9)
    assert result.confusion.shape == (5, 5) and result.confusion.sum() == 9
    assert result.confusion.trace().item() == 5
    pred = emb.argmax(-1)
    expected = torch.zeros(5, 5, dtype=torch.long)
    for y, p in zip(labels, pred.tolist()):
        expected[y, p] += 1
    assert torch.equal(result.confusion, expected)
    assert result.per_class == pytest.approx({"a": 0.5, "b": 1.0, "c": 1.0, "d": 0.0, "e": 2 / 3})
    assert result.to_dict("val/") == pytest.approx({"val/top1": 5 / 9, "val/top5": ref["top5"], "val/num_samples": 9})


def test_evaluate_ties_keep_confusion_consistent_with_top1():
    model = StubModel(dim=3)
    batches = [(torch.ones(2, 3), torch.tensor([0, 2]))]  # all classes tie
    result = evaluate_zero_shot(model, batches, torch.eye(3), top_k=(1,), progress=False)
    assert result.top1 == 0.0 and result.confusion.trace() == 0
    assert result.per_class == {"0": 0.0, "2": 0.0}  # classes without samples are left out


def test_evaluate_with_meta_batches():
    names = ["circle", "square", "triangle"]
    emb = torch.eye(3)[[0, 1, 2, 2]] + 0.01
    batch_obj = SimpleNamespace(inputs={"image": emb[:2]}, meta=[{"shape": "circle"}, {"shape": "triangle"}])
    batch_dict = {"inputs": {"image": emb[2:]}, "meta": [{"shape": "triangle"}, {"shape": "triangle"}]}
    model = StubModel(dim=3)
    result = evaluate_zero_shot(
        model, [batch_obj, batch_dict], torch.eye(3), meta_label_fn(names), progress=False, class_names=names
    )
    # Sample 1 is a square labelled triangle: the only miss.
    assert result.num_samples == 4 and result.top1 == pytest.approx(0.75)
    assert result.per_class == pytest.approx({"circle": 1.0, "triangle": 2 / 3})
    # Samples without a usable label are dropped and counted when asked, including whole batches.
    label_fn = meta_label_fn(names, skip_unknown=True)
    unlabelled = {"inputs": {"image": emb[:2]}, "meta": [{"shape": None}, {}]}
    mixed = {"inputs": {"image": emb[:3]}, "meta": [{"shape": "hexagon"}, {"shape": "square"}, {"shape": "circle"}]}
    result = evaluate_zero_shot(model, [unlabelled, mixed], torch.eye(3), label_fn, progress=False, class_names=names)
    assert label_fn.num_skipped == 3
    assert result.num_samples == 2 and result.top1 == 0.5  # emb[1] is a square, emb[2] is not a circle
    assert result.per_class == pytest.approx({"circle": 0.0, "square": 1.0})
    with pytest.raises(ValueError, match="'hexagon' is not a class"):
        evaluate_zero_shot(
            model,
            [{"inputs": {"image": emb[:1]}, "meta": [{"shape": "hexagon"}]}],
            torch.eye(3),
            meta_label_fn(names),
            progress=False,
        )


def test_evaluate_errors():
    model = StubModel(dim=3)
    with pytest.raises(ValueError, match="no samples"):
        evaluate_zero_shot(model, [], torch.eye(3), progress=False)
    with pytest.raises(ValueError, match="label_fn"):
        evaluate_zero_shot(model, [{"image": torch.randn(2, 3)}], torch.eye(3), progress=False)
    with pytest.raises(ValueError, match=r"batch 0: labels must lie in \[0, 3\)"):
        evaluate_zero_shot(model, [(torch.randn(2, 3), torch.tensor([0, 5]))], torch.eye(3), progress=False)
