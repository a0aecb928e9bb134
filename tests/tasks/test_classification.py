import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polymodal.datasets import Batch, collate_samples
from polymodal.encoders import VisionTransformer
from polymodal.tasks import (
    BatchLabels,
    ClassificationHead,
    classification_metrics,
    evaluate_classifier,
    extract_features,
    fit_linear_probe,
    split_validation,
)
from polymodal.train.classifier import train_classifier
from tests.helpers import assert_all_params_get_grad


class StubEncoder(nn.Module):
    """A linear "encoder" with the attributes classification heads read."""

    def __init__(self, d_in=6, d_out=4):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.drop = nn.Dropout(0.5)
        self.output_dim = d_out

    def forward(self, x):
        return self.drop(self.proj(x))


def blobs(n, num_classes=3, dim=6, seed=0, spread=0.6):
    """Gaussian blobs around fixed class centres: ``(x (n, dim), y (n,))``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(num_classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


# ---------------------------------------------------------------------------------------- the head


def test_head_shapes_and_every_parameter_learns():
    encoder = VisionTransformer(image_size=16, patch_size=8, width=32, layers=1, heads=2, output_dim=16)
    model = ClassificationHead(encoder, num_classes=5, dropout=0.1)
    logits = model(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 5)
    assert_all_params_get_grad(model, F.cross_entropy(logits, torch.tensor([0, 1, 4])))


def test_frozen_encoder_stays_frozen_and_in_eval_mode():
    encoder = StubEncoder()
    model = ClassificationHead(encoder, 3, freeze_encoder=True)
    model.train()
    assert not encoder.training and model.head.training
    assert all(not p.requires_grad for p in encoder.parameters())
    x = torch.randn(8, 6)
    torch.testing.assert_close(model.features(x), encoder.proj(x))  # dropout off: eval mode
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    assert model.head.weight.grad is not None and encoder.proj.weight.grad is None


def test_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ClassificationHead(StubEncoder(), 0)
    with pytest.raises(ValueError, match="pass feature_dim"):
        ClassificationHead(nn.Linear(3, 3), 2)
    model = ClassificationHead(nn.Linear(3, 5), 2, feature_dim=4)
    with pytest.raises(ValueError, match=r"expects \(B, 4\)"):
        model(torch.randn(2, 3))


def test_from_linear_reuses_the_trained_layer():
    linear = nn.Linear(4, 3)
    model = ClassificationHead.from_linear(StubEncoder(), linear)
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), linear(model.encoder.proj(x)))
    assert model.encoder_frozen


# ---------------------------------------------------------------------------------------- metrics


def naive_metrics(logits, labels, num_classes):
    """Top-1/top-5 with ties counted as misses, per-class accuracy and the confusion matrix, by loops."""
    top1 = top5 = 0
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for row, y in zip(logits.tolist(), labels.tolist()):
        better_or_tied = sum(1 for c, v in enumerate(row) if c != y and v >= row[y])
        top1 += better_or_tied == 0
        top5 += better_or_tied < 5
        pred = y if better_or_tied == 0 else max((v, -c) for c, v in enumerate(row) if c != y)
        pred = pred if isinstance(pred, int) else -pred[1]
        confusion[y][pred] += 1
    n = len(labels)
    return top1 / n, top5 / n, confusion


def test_metrics_match_a_naive_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g).round(decimals=1)  # rounding makes ties happen
    labels = torch.randint(7, (200,), generator=g)
    names = [f"c{i}" for i in range(7)]
    result = classification_metrics(logits, labels, names)
    top1, top5, confusion = naive_metrics(logits, labels, 7)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)
    assert result.confusion.tolist() == confusion
    for c, name in enumerate(names):
        support = sum(confusion[c])
        assert result.per_class[name] == pytest.approx(confusion[c][c] / support)
    assert result.num_samples == 200 and result.to_dict("x/")["x/top1"] == result.top1


def test_metrics_count_ties_as_misses_and_skip_top5_for_few_classes():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    result = classification_metrics(logits, torch.tensor([0, 1]), ["a", "b", "c"])
    assert result.topk == {1: 0.5}  # sample 0 ties with class b: a miss
    assert result.confusion.tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert result.per_class == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"logits must be \(N, 3\)"):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_metrics(logits, torch.tensor([0, 3]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), ["a", "b", "c"])


def test_batch_labels_read_meta():
    items = [
        {"image": torch.full((2,), float(i)), "text": torch.tensor([i]), "meta": {"shape": s}}
        for i, s in enumerate(["ring", None, "star"])
    ]
    batch = collate_samples(items)
    with pytest.raises(ValueError, match=r"meta\[1\]\['shape'\] = None is not a class"):
        BatchLabels(["star", "ring"], "shape", "image")(batch)
    labels = BatchLabels(["star", "ring"], "shape", "image", skip_unknown=True)
    x, y = labels(batch)
    assert y.tolist() == [1, 0] and x[:, 0].tolist() == [0.0, 2.0] and labels.num_skipped == 1
    both, y = BatchLabels(["star", "ring"], "shape", ["image", "text"], skip_unknown=True)(batch)
    assert set(both) == {"image", "text"} and both["text"].flatten().tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"batch inputs have no \['audio'\]"):
        BatchLabels(["star"], "shape", "audio")(Batch(batch.inputs, batch.meta, {}, 3))


# ---------------------------------------------------------------------------------------- training loop


def test_train_and_evaluate_a_head_over_a_frozen_encoder():
    x, y = blobs(600, num_classes=3, dim=6)
    encoder = StubEncoder(6, 6)
    with torch.no_grad():
        encoder.proj.weight.copy_(torch.eye(6))
        encoder.proj.bias.zero_()
    model = ClassificationHead(encoder, 3, freeze_encoder=True)
    before = encoder.proj.weight.clone()
    loader = DataLoader(TensorDataset(x[:500], y[:500]), batch_size=50, shuffle=True)
    losses = train_classifier(model, loader, steps=60, lr=5e-2, progress=False)
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10]) / 3
    torch.testing.assert_close(encoder.proj.weight, before)
    result = evaluate_classifier(model, DataLoader(TensorDataset(x[500:], y[500:]), batch_size=64), ["a", "b", "c"])
    assert result.top1 > 0.95 and result.num_samples == 100
    assert model.training  # evaluate_classifier restores the flags it found


# ---------------------------------------------------------------------------------------- linear probe


def penalised_objective(x, y, weight, bias, wd):
    """The probe's objective on standardised features, written out independently."""
    log_probs = (x @ weight.T + bias).log_softmax(dim=-1)
    return -log_probs[torch.arange(len(y)), y].mean() + 0.5 * wd * (weight**2).sum()


def test_probe_reaches_the_optimum_of_its_objective():
    x, y = blobs(400, num_classes=4, dim=5, spread=1.5)
    x = x * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 5.0  # badly scaled raw features
    wd = 1e-2
    mean, std = x.mean(0), x.std(0, unbiased=False)

    def objective_at(probe):
        # Undo the folded standardisation: the head on standardised features.
        weight = (probe.head.weight.detach() * std).requires_grad_(True)
        bias = (probe.head.bias.detach() + probe.head.weight.detach() @ mean).requires_grad_(True)
        value = penalised_objective((x - mean) / std, y, weight, bias, wd)
        value.backward()
        return value.item(), torch.cat([weight.grad.flatten(), bias.grad]).norm().item()

    exact = fit_linear_probe(x, y, 4, weight_decay=wd, progress=False)
    value, gradient_norm = objective_at(exact)
    assert gradient_norm < 1e-4  # a stationary point of a strictly convex objective: the optimum
    assert exact.weight_decay == wd and exact.val_accuracy == {} and exact.num_train == 400
    adam = fit_linear_probe(
        x, y, 4, weight_decay=wd, method="adam", epochs=300, lr=5e-2, batch_size=128, progress=False
    )
    assert objective_at(adam)[0] == pytest.approx(value, abs=1e-3)


def test_probe_generalises_and_chooses_the_decay_on_validation_data():
    x, y = blobs(900, num_classes=3, dim=6, spread=1.0)
    tx, ty, vx, vy = split_validation(x[:600], y[:600], 0.25, seed=1)
    probe = fit_linear_probe(tx, ty, 3, vx, vy, weight_decays=[1e-3, 1e-1, 10.0], progress=False)
    assert set(probe.val_accuracy) == {1e-3, 1e-1, 10.0}
    best = max(probe.val_accuracy.values())
    assert probe.weight_decay == max(w for w, a in probe.val_accuracy.items() if a == best)
    assert probe.num_train == 600  # refitted on training + validation data
    assert (probe.predict(x[600:]) == y[600:]).float().mean() > 0.9


def test_probe_with_a_strong_decay_returns_to_its_prior():
    x, y = blobs(300, num_classes=3, dim=4)
    prior = nn.Linear(4, 3)
    probe = fit_linear_probe(x, y, 3, weight_decay=1e6, prior=prior, progress=False)
    torch.testing.assert_close(probe.head.weight, prior.weight.detach(), atol=1e-4, rtol=1e-3)
    free = fit_linear_probe(x, y, 3, weight_decay=1e-4, prior=prior, progress=False)
    assert (free.predict(x) == y).float().mean() > 0.95


def test_probe_rejects_bad_input():
    x, y = blobs(50)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_linear_probe(x, y, method="sgd")
    with pytest.raises(ValueError, match="give both val_features and val_labels"):
        fit_linear_probe(x, y, val_features=x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_linear_probe(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="val_features have 3 dimensions"):
        fit_linear_probe(x, y, val_features=torch.zeros(2, 3), val_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"prior must be weights \(3, 6\)"):
        fit_linear_probe(x, y, 3, prior=nn.Linear(5, 3))


def test_grouped_validation_keeps_each_group_on_one_side():
    x, y = blobs(300)
    groups = [i % 10 for i in range(300)]
    tx, ty, vx, vy = split_validation(x, y, 0.3, seed=0, groups=groups)
    train_rows = {tuple(r) for r in tx.tolist()}
    val_groups = {groups[i] for i, r in enumerate(x.tolist()) if tuple(r) not in train_rows}
    train_groups = {groups[i] for i, r in enumerate(x.tolist()) if tuple(r) in train_rows}
    assert not val_groups & train_groups and len(vx) == 90 and len(tx) + len(vx) == 300
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_validation(x, y, 0.3, groups=[0] * 300)


def test_extract_features_runs_the_encoder_once_per_sample_in_eval_mode():
    x, y = blobs(70)
    encoder = StubEncoder(6, 4)
    encoder.train()
    feats, labels = extract_features(encoder, DataLoader(TensorDataset(x, y), batch_size=32), progress=False)
    torch.testing.assert_close(feats, encoder.proj(x).detach())  # dropout was off
    assert labels.tolist() == y.tolist() and encoder.training
    items = [{"image": x[i], "meta": {"k": "ab"[int(y[i]) % 2]}} for i in range(10)]
    loader = DataLoader(items, batch_size=4, collate_fn=collate_samples)
    feats, labels = extract_features(
        lambda inputs: inputs["image"][:, :2], loader, BatchLabels(["a", "b"], "k", ["image"]), progress=False
    )
    assert feats.shape == (10, 2) and labels.tolist() == [int(v) % 2 for v in y[:10]]


# ---------------------------------------------------------------------------------------- fusion needs both


class WordTokenizer:
    """Word-level ids over the claims' small vocabulary (1 = start, 2 = end, 0 = padding)."""

    def __init__(self, context_length=8):
        from polymodal.datasets import COLOURS, SHAPES
        from polymodal.datasets.shape_claims import CLAIM_TEMPLATES

        words = {w for t in CLAIM_TEMPLATES for w in t.split() if w != "{}"} | {"a", "an", *COLOURS, *SHAPES}
        self.ids = {w: i + 3 for i, w in enumerate(sorted(words))}
        self.context_length = context_length

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1, *(self.ids[w] for w in text.split()), 2][: self.context_length]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def claims_tensors(split, n, tokenizer):
    from polymodal.datasets.shape_claims import ShapeClaimsDataset
    from polymodal.encoders import image_transform

    ds = ShapeClaimsDataset(
        split,
        n,
        seed=0,
        image_size=32,
        transform=image_transform(32, is_train=False),
        tokenizer=tokenizer,
        wrong=("colour",),
    )
    batch = collate_samples([ds[i] for i in range(n)])
    return batch.inputs["image"], batch.inputs["text"], torch.tensor([m["verdict"] == "match" for m in batch.meta])


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread; on a busy 2-core machine a second one mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_late_fusion_classifier_needs_both_modalities_for_claims(one_thread):
    """Image + claim "is it true?": the image alone and the claim alone are provably at chance (see
    polymodal.datasets.shape_claims); the fused classifier, trained with the same budget, is not."""
    from polymodal import LateFusionClassifier
    from polymodal.encoders import TextTransformer
    from polymodal.fusion import ConcatFusion

    tokenizer = WordTokenizer()
    train = claims_tensors("train", 3000, tokenizer)
    test = claims_tensors("heldout", 600, tokenizer)

    def build(modalities):
        torch.manual_seed(0)
        towers = {}
        if "image" in modalities:
            towers["image"] = VisionTransformer(
                image_size=32, patch_size=8, width=32, layers=2, heads=2, output_dim=32, pool_type="mean"
            )
        if "text" in modalities:
            towers["text"] = TextTransformer(
                vocab_size=len(tokenizer.ids) + 3,
                context_length=8,
                width=32,
                layers=1,
                heads=2,
                output_dim=32,
                pool_type="eos",
                eos_token_id=2,
            )
        fusion = ConcatFusion({m: 32 for m in modalities}, output_dim=64, act_layer="gelu")
        return LateFusionClassifier(towers, fusion, head=2)

    accuracy = {}
    for modalities in (["image"], ["text"], ["image", "text"]):
        model = build(modalities)

        def label_fn(batch, modalities=modalities):
            image, text, labels = batch
            inputs = {"image": image, "text": text}
            return {m: inputs[m] for m in modalities}, labels.long()

        loader = DataLoader(
            TensorDataset(*train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        train_classifier(model, loader, steps=700, label_fn=label_fn, lr=2e-3, progress=False)
        result = evaluate_classifier(
            model, DataLoader(TensorDataset(*test), batch_size=200), ["mismatch", "match"], label_fn, progress=False
        )
        accuracy["+".join(modalities)] = result.top1
    print(f"held-out accuracy with the same budget: {accuracy}")
    assert accuracy["image"] < 0.6 and accuracy["text"] < 0.6
    assert accuracy["image+text"] > 0.85
    assert accuracy["image+text"] > max(accuracy["image"], accuracy["text"]) + 0.25
