"""The benchmark metrics against naive references computed here from the embeddings: top-1 / top-5 from an argmax
over per-class prompt means, recall@k by brute force over every caption, and a linear probe's accuracy from its
own logits on features embedded one image at a time."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.datasets import (
    CaptionedImageDataset,
    ImageFolderDataset,
    WdsBenchmarkDataset,
    collate_samples,
    read_clip_benchmark_wds,
    read_karpathy,
)
from polymodal.tasks import (
    DEFAULT_WEIGHT_DECAYS,
    format_benchmark,
    linear_probe_benchmark,
    retrieval_benchmark,
    zero_shot_benchmark,
)
from tests.benchmark_data import (
    CLASSES,
    captions_of,
    classification_samples,
    karpathy_entry,
    shape_images,
    write_clip_benchmark_wds,
    write_image_folder,
    write_karpathy,
)

TEMPLATES = ["a photo of a {} shape.", "a {} thing."]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("clip-vit-tiny").eval()


def loader(data, batch_size=8):
    return DataLoader(data, batch_size=batch_size, collate_fn=collate_samples)


@torch.no_grad()
def embed_images(model, images):
    transform = get_preprocess(model, "image")
    return torch.cat([model.encode_image(transform(im)[None], normalize=True) for im in images])


@torch.no_grad()
def naive_class_weights(model, names):
    tokenizer = get_tokenizer(model)
    rows = []
    for name in names:
        emb = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]), normalize=True)
        rows.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(rows)


def test_zero_shot_matches_an_argmax_over_prompt_means_and_counts_bad_images(model, tmp_path):
    images = shape_images(24)
    write_image_folder(tmp_path, images)
    (tmp_path / "red" / "broken.png").write_bytes(b"\x89PNG but not really")
    data = ImageFolderDataset(tmp_path, get_preprocess(model, "image"))
    result = zero_shot_benchmark(model, get_tokenizer(model), loader(data), data.classes, TEMPLATES, progress=False)

    assert result.task == "zeroshot" and result.num_samples == 24 and result.skipped == {"corrupt_image": 1}
    # the folder order: sorted class folders, images sorted by name inside each
    order = sorted(range(24), key=lambda i: (images[i][1], i))
    labels = torch.tensor([data.classes.index(images[i][1]) for i in order])
    scores = embed_images(model, [images[i][0] for i in order]) @ naive_class_weights(model, data.classes).T
    top5 = scores.topk(5, dim=1).indices
    m = result.metrics
    assert m["top1"] == pytest.approx((scores.argmax(1) == labels).double().mean().item())
    assert m["top5"] == pytest.approx((top5 == labels[:, None]).any(1).double().mean().item())
    recall = {c: (scores.argmax(1)[labels == i] == i).double().mean().item() for i, c in enumerate(data.classes)}
    recall = {c: v for c, v in recall.items() if not np.isnan(v)}
    assert m["per_class_recall"] == pytest.approx(recall)
    assert m["mean_per_class_recall"] == pytest.approx(sum(recall.values()) / len(recall))
    expected = torch.zeros(len(data.classes), len(data.classes), dtype=torch.long)
    for t, p in zip(labels.tolist(), scores.argmax(1).tolist()):
        expected[t, p] += 1
    assert torch.equal(result.classification.confusion, expected)
    lines = format_benchmark(result)
    assert lines[0].startswith(f"top-1 {100 * m['top1']:.1f}%, top-5 ") and lines[1].startswith("per-class recall: ")


def test_zero_shot_refuses_labels_beyond_the_class_names(model, tmp_path):
    samples = classification_samples(shape_images(3))
    samples[1]["cls"] = 9
    write_clip_benchmark_wds(tmp_path, samples)
    data = WdsBenchmarkDataset(read_clip_benchmark_wds(tmp_path), get_preprocess(model, "image"))
    with pytest.raises(ValueError, match=r"outside the 8 class names, e.g. label 9 \(key s0000001, shard .*0.tar\)"):
        zero_shot_benchmark(model, get_tokenizer(model), loader(data), CLASSES, TEMPLATES, progress=False)


def brute_force_recall(query: torch.Tensor, gallery: torch.Tensor, relevant: list[set[int]], k: int) -> float:
    hits = 0
    for q in range(query.shape[0]):
        scores = [float(query[q] @ gallery[g]) for g in range(gallery.shape[0])]
        best = max(scores[g] for g in relevant[q])
        rank = 1 + sum(1 for g, s in enumerate(scores) if g not in relevant[q] and s >= best)
        hits += rank <= k
    return hits / query.shape[0]


def test_retrieval_matches_brute_force_recall_both_ways(model, tmp_path):
    images = shape_images(7)
    entries, files = [], {}
    for i, (image, colour, caption) in enumerate(images):
        entries.append(karpathy_entry(f"{i}.png", "test", captions_of(caption, colour, i), filepath="val2014"))
        files[f"val2014/{i}.png"] = image
    del files["val2014/3.png"]  # a missing image is skipped, and its captions with it
    entries.append(karpathy_entry("train.png", "train", ["not in the test split"]))
    path = write_karpathy(tmp_path, entries, images=files)
    data = CaptionedImageDataset(read_karpathy(path, "test"), get_preprocess(model, "image"))
    result = retrieval_benchmark(model, get_tokenizer(model), loader(data, 4), text_batch_size=7, progress=False)

    kept = [i for i in range(7) if i != 3]
    assert result.num_samples == 6 and result.skipped == {"missing_file": 1}
    captions = [c for i in kept for c in captions_of(images[i][2], images[i][1], i)]
    owner = [j for j in range(6) for _ in range(5)]
    assert result.metrics["num_captions"] == 30
    with torch.no_grad():
        texts = model.encode_text(get_tokenizer(model)(captions), normalize=True)
    ims = embed_images(model, [images[i][0] for i in kept])
    for k in (1, 5, 10):
        i2t = brute_force_recall(ims, texts, [{t for t in range(30) if owner[t] == j} for j in range(6)], k)
        t2i = brute_force_recall(texts, ims, [{owner[t]} for t in range(30)], k)
        assert result.metrics[f"image_to_text/R@{k}"] == pytest.approx(i2t, abs=1e-9)
        assert result.metrics[f"text_to_image/R@{k}"] == pytest.approx(t2i, abs=1e-9)
    assert result.metrics["text_to_image/R@10"] == 1.0  # 6 images: every caption's image is in the top 10
    assert format_benchmark(result)[0].startswith(
        f"image -> text: R@1 {100 * result.metrics['image_to_text/R@1']:.1f}%"
    )


def test_linear_probe_accuracy_is_that_of_its_own_head_on_the_test_images(model, tmp_path):
    train_images, test_images = shape_images(32), shape_images(24, offset=32)
    write_image_folder(tmp_path / "train", train_images)
    write_image_folder(tmp_path / "test", test_images)
    transform = get_preprocess(model, "image")
    train, test = ImageFolderDataset(tmp_path / "train", transform), ImageFolderDataset(tmp_path / "test", transform)
    assert train.classes == test.classes == sorted(CLASSES)
    result = linear_probe_benchmark(model, loader(train), loader(test), train.classes, progress=False)

    order = sorted(range(24), key=lambda i: (test_images[i][1], i))
    labels = torch.tensor([train.classes.index(test_images[i][1]) for i in order])
    predicted = result.probe.logits(embed_images(model, [test_images[i][0] for i in order])).argmax(1)
    assert result.num_samples == 24 and result.metrics["num_train"] == 32
    assert result.metrics["top1"] == pytest.approx((predicted == labels).double().mean().item())
    assert result.metrics["weight_decay"] in DEFAULT_WEIGHT_DECAYS and result.probe.val_accuracy  # searched


def test_linear_probe_separates_plain_colours_and_holds_out_a_fraction(model, tmp_path):
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(10):
            pixels = np.clip(np.array(rgb) + rng.integers(-20, 21, size=(48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = ImageFolderDataset(tmp_path, get_preprocess(model, "image"))
    result = linear_probe_benchmark(
        model, loader(data), None, data.classes, val_fraction=0.25, weight_decay=1e-4, progress=False
    )
    assert result.num_samples == 10 and result.metrics["num_train"] == 30
    assert result.metrics["top1"] == 1.0 and result.metrics["mean_per_class_recall"] == 1.0
    assert "top5" not in result.metrics  # 4 classes: top-5 would always be right


@pytest.mark.slow
def test_a_trained_model_tells_colours_apart_on_a_clip_benchmark_export(trained_shapes_run, tmp_path):
    trained = from_pretrained(trained_shapes_run).eval()
    write_clip_benchmark_wds(tmp_path, classification_samples(shape_images(80)), max_count=32)
    data = WdsBenchmarkDataset(read_clip_benchmark_wds(tmp_path), get_preprocess(trained, "image"))
    result = zero_shot_benchmark(trained, get_tokenizer(trained), loader(data, 32), CLASSES, TEMPLATES, progress=False)
    assert result.num_samples == 80
    assert result.metrics["top1"] > 0.5 and result.metrics["top5"] > 0.9  # chance: 0.125 and 0.625
