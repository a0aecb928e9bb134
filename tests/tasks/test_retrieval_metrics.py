"""Retrieval metrics against a brute-force reference, with several captions per image and ties."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from polymodal.tasks.retrieval_metrics import (
    image_text_retrieval_metrics,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
)


def brute_force_ranks(query, gallery, relevant: list[list[int]]) -> list[int]:
    """Sort the whole gallery per query (score descending, non-relevant first among equal scores)."""
    scores = (query.double() @ gallery.double().T).tolist()
    ranks = []
    for q, row in enumerate(scores):
        rel = set(relevant[q])
        order = sorted(range(len(row)), key=lambda g: (-row[g], g in rel))
        ranks.append(next(pos for pos, g in enumerate(order) if g in rel) + 1)
    return ranks


def brute_force_metrics(query, gallery, relevant, ks):
    ranks = brute_force_ranks(query, gallery, relevant)
    out = {f"R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}
    out["median_rank"] = float(statistics.median(ranks))
    out["mean_rank"] = sum(ranks) / len(ranks)
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_matches_brute_force_with_several_relevant_items(chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    query = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    gallery = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    relevant = [torch.randperm(30, generator=g)[: 1 + q % 4].tolist() for q in range(20)]
    ks = (1, 3, 5, 10)
    out = retrieval_metrics(query, gallery, relevant, ks=ks, chunk_size=chunk_size)
    assert out == pytest.approx(brute_force_metrics(query, gallery, relevant, ks))
    ranks = retrieval_ranks(query, gallery, relevant, chunk_size=chunk_size)
    assert ranks.tolist() == brute_force_ranks(query, gallery, relevant)
    assert ranks.dtype == torch.long


def test_tensor_relevance_equals_list_relevance():
    query, gallery = torch.randn(9, 4), torch.randn(6, 4)
    target = torch.randint(0, 6, (9,))
    a = retrieval_metrics(query, gallery, target, chunk_size=2)
    b = retrieval_metrics(query, gallery, [[int(t)] for t in target], chunk_size=4)
    c = retrieval_metrics(query, gallery, [int(t) for t in target])
    assert a == b == c


def test_ties_are_counted_against_the_query():
    a, b = [1.0, 0.0], [0.0, 1.0]
    gallery = torch.tensor([a, a, b, a])  # items 0, 1 and 3 are identical
    query = torch.tensor([a, a, b, b])
    relevant = [[1], [0, 3], [2], [0]]
    ranks = retrieval_ranks(query, gallery, relevant, chunk_size=3).tolist()
    # Query 0: items 0 and 3 tie with relevant 1 and go ahead of it. Query 1: two of the three tied
    # items are relevant, only item 1 goes ahead. Query 2: a clear winner. Query 3: relevant item 0
    # scores 0 like items 1 and 3, and item 2 scores 1, so all three go ahead.
    assert ranks == [3, 2, 1, 4]
    assert ranks == brute_force_ranks(query, gallery, relevant)


def test_collapsed_embeddings_get_the_worst_rank():
    emb = torch.zeros(5, 3)
    out = retrieval_metrics(emb, emb, torch.arange(5), ks=(1, 4, 5))
    assert out == {"R@1": 0.0, "R@4": 0.0, "R@5": 1.0, "median_rank": 5.0, "mean_rank": 5.0}


def test_median_of_an_even_count_averages_the_middle_pair():
    eye = torch.eye(4)
    # Gallery ordered so that query q's relevant item lands at rank q + 1.
    query = torch.ones(4, 4)
    gallery = eye * torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
    out = retrieval_metrics(query, gallery, torch.arange(4), ks=(1, 2))
    assert out == {"R@1": 0.25, "R@2": 0.5, "median_rank": 2.5, "mean_rank": 2.5}
    assert recall_at_k(torch.tensor([1, 2, 3, 4]), 3) == 0.75


def test_image_text_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    num_images, dim = 12, 16
    text_to_image = torch.tensor([i for i in range(num_images) for _ in range(1 + i % 3)])
    images = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    out = image_text_retrieval_metrics(images, texts, text_to_image, ks=(1, 5), chunk_size=5)
    captions = [[t for t in range(len(text_to_image)) if text_to_image[t] == i] for i in range(num_images)]
    t2i = brute_force_metrics(texts, images, [[int(i)] for i in text_to_image], (1, 5))
    i2t = brute_force_metrics(images, texts, captions, (1, 5))
    expected = {f"text_to_image/{k}": v for k, v in t2i.items()} | {f"image_to_text/{k}": v for k, v in i2t.items()}
    assert out == pytest.approx(expected)
    assert set(out) == {
        f"{d}/{m}" for d in ("text_to_image", "image_to_text") for m in ("R@1", "R@5", "median_rank", "mean_rank")
    }


def test_image_to_text_counts_any_caption():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Image 0's first caption points away from it; its second caption is its nearest text.
    texts = torch.tensor([[-1.0, 0.0], [0.9, 0.1], [0.1, 0.9]])
    out = image_text_retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1,))
    assert out["image_to_text/R@1"] == 1.0
    assert out["text_to_image/R@1"] == pytest.approx(2 / 3)  # caption 0 finds the wrong image


def test_errors():
    emb = torch.randn(3, 4)
    with pytest.raises(ValueError, match="have no caption"):
        image_text_retrieval_metrics(emb, emb[:2], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        image_text_retrieval_metrics(emb, emb, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="integer image indices"):
        image_text_retrieval_metrics(emb, emb, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="same embedding width"):
        retrieval_metrics(emb, torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match=r"queries \[1\] have no relevant"):
        retrieval_metrics(emb, emb, [[0], [], [2]])
    with pytest.raises(ValueError, match="3 entries for 2 queries"):
        retrieval_metrics(emb[:2], emb, torch.arange(3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(emb, emb, [[0], [1, 3], [2]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((3, 4), math.nan), emb, torch.arange(3))
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics(emb, emb, torch.arange(3), ks=(0, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(emb, emb, torch.arange(3), chunk_size=0)
