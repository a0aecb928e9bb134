"""Retrieval metrics: recall@k, median and mean rank, with any number of relevant items per query.

Scores are dot products of the query and gallery embeddings (cosine similarity when both are
L2-normalised). A query's rank is the 1-based position of its best-ranked relevant gallery item;
a query is a hit at k when that rank is at most k, i.e. when *any* of its relevant items is in
the top k.

Ties are counted against the query (pessimistic): a non-relevant item scoring exactly as high as
the best relevant one is ranked ahead of it, so ``rank = 1 + #{non-relevant items scoring >= the
best relevant score}``. Other relevant items never push a relevant item down. A model whose
embeddings collapse to one point therefore gets the worst rank, not a perfect score, and the
result does not depend on the order of the gallery.

Queries are scored ``chunk_size`` at a time against the whole gallery, so peak memory is about
``chunk_size * G`` floats (plus a boolean mask of the same size); lower ``chunk_size`` for very
large galleries.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

QueryToGallery = Sequence[Sequence[int]] | Sequence[int] | torch.Tensor


def _check_embeddings(query_emb: torch.Tensor, gallery_emb: torch.Tensor, name: str) -> None:
    for what, t in (("query_emb", query_emb), ("gallery_emb", gallery_emb)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.dtype.is_floating_point:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {what} must be a floating (N, D) tensor, got {got}")
        if t.shape[0] == 0:
            raise ValueError(f"{name}: {what} is empty")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: {what} holds NaN or infinite values")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            f"{name}: query_emb {tuple(query_emb.shape)} and gallery_emb {tuple(gallery_emb.shape)} "
            "must have the same embedding width D"
        )


def _relevance(
    query_to_gallery: QueryToGallery, num_queries: int, num_gallery: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant pairs as two flat index tensors ``(rows, cols)``, sorted by query index ``rows``."""
    if isinstance(query_to_gallery, torch.Tensor):
        if query_to_gallery.ndim != 1 or not _is_integer(query_to_gallery):
            raise ValueError(
                f"query_to_gallery as a tensor must be integer indices of shape (Q,), got "
                f"{query_to_gallery.dtype} {tuple(query_to_gallery.shape)}"
            )
        if query_to_gallery.shape[0] != num_queries:
            raise ValueError(f"query_to_gallery has {query_to_gallery.shape[0]} entries for {num_queries} queries")
        rows, cols = torch.arange(num_queries), query_to_gallery.detach().cpu().long()
        _check_range(cols, num_gallery)
        return rows, cols
    if isinstance(query_to_gallery, str) or not isinstance(query_to_gallery, Sequence):
        raise ValueError(
            f"query_to_gallery must be a LongTensor (Q,) or a list of index lists, "
            f"got {type(query_to_gallery).__name__}"
        )
    lists = [_indices(i) for i in query_to_gallery]
    if len(lists) != num_queries:
        raise ValueError(f"query_to_gallery has {len(lists)} entries for {num_queries} queries")
    empty = [q for q, items in enumerate(lists) if not items]
    if empty:
        raise ValueError(f"queries {empty[:10]} have no relevant gallery item; each query needs at least one")
    rows = torch.tensor([q for q, items in enumerate(lists) for _ in items], dtype=torch.long)
    cols = torch.tensor([i for items in lists for i in items], dtype=torch.long)
    _check_range(cols, num_gallery)
    return rows, cols


def _indices(items: object) -> list[int]:
    """One query's relevant indices: a single index or a collection of them."""
    if isinstance(items, torch.Tensor):
        return [int(i) for i in items.reshape(-1).tolist()]
    if isinstance(items, (Sequence, set, frozenset)) and not isinstance(items, str):
        return [operator.index(i) for i in items]
    return [operator.index(items)]


def _is_integer(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _check_range(cols: torch.Tensor, num_gallery: int) -> None:
    if cols.numel() and (cols.min() < 0 or cols.max() >= num_gallery):
        raise ValueError(
            f"query_to_gallery indices must lie in [0, {num_gallery}), got {cols.min().item()}..{cols.max().item()}"
        )


def retrieval_ranks(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    query_to_gallery: QueryToGallery,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """1-based rank of each query's best relevant gallery item, ties counted against it: ``LongTensor (Q,)``.

    Args:
        query_emb: ``(Q, D)`` query embeddings.
        gallery_emb: ``(G, D)`` gallery embeddings.
        query_to_gallery: the relevant gallery indices of each query: a ``LongTensor (Q,)`` (one
            each) or a list of Q non-empty index lists.
        chunk_size: queries scored at once.
    """
    _check_embeddings(query_emb, gallery_emb, "retrieval_ranks")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_queries, num_gallery = query_emb.shape[0], gallery_emb.shape[0]
    rows, cols = _relevance(query_to_gallery, num_queries, num_gallery)
    device = query_emb.device
    rows, cols = rows.to(device), cols.to(device)
    gallery = gallery_emb.to(device).float()
    ranks = torch.empty(num_queries, dtype=torch.long, device=device)
    starts = range(0, num_queries, chunk_size)
    # rows is sorted, so each chunk's relevant pairs are one contiguous slice.
    bounds = torch.searchsorted(rows, torch.tensor([*starts, num_queries], device=device)).tolist()
    for c, start in enumerate(starts):
        end = min(start + chunk_size, num_queries)
        scores = query_emb[start:end].float() @ gallery.T  # (n, G)
        lo, hi = bounds[c], bounds[c + 1]
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[rows[lo:hi] - start, cols[lo:hi]] = True
        best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)  # (n, 1)
        ranks[start:end] = ((scores >= best) & ~relevant).sum(dim=1) + 1
    return ranks


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Fraction of queries whose best relevant item is within the top ``k``."""
    return (ranks <= k).double().mean().item()


def _median(ranks: torch.Tensor) -> float:
    # The mean of the two middle values for an even count (numpy's convention), not torch's lower one.
    s = ranks.sort().values.double()
    mid = s.numel() // 2
    return s[mid].item() if s.numel() % 2 else ((s[mid - 1] + s[mid]) / 2).item()


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers such as (1, 5, 10), got {ks!r}")
    return tuple(sorted(set(ks)))


def retrieval_metrics(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    query_to_gallery: QueryToGallery,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k, median rank and mean rank of queries against a gallery.

    Args:
        query_emb: ``(Q, D)`` query embeddings.
        gallery_emb: ``(G, D)`` gallery embeddings.
        query_to_gallery: relevant gallery indices per query (``LongTensor (Q,)`` or index lists).
        ks: the k values for recall.
        chunk_size: queries scored at once.

    Returns:
        ``{"R@1": fraction, "R@5": ..., "median_rank": ..., "mean_rank": ...}``.
    """
    ks = _check_ks(ks)
    ranks = retrieval_ranks(query_emb, gallery_emb, query_to_gallery, chunk_size=chunk_size)
    out = {f"R@{k}": recall_at_k(ranks, k) for k in ks}
    out["median_rank"] = _median(ranks)
    out["mean_rank"] = ranks.double().mean().item()
    return out


def image_text_retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Retrieval in both directions between images and their captions (several captions per image allowed).

    Text to image: each caption's one relevant image is ``text_to_image[t]``. Image to text: every
    caption of the image is relevant, so the image is a hit at k if any of them is in the top k.

    Args:
        image_emb: ``(N_img, D)`` image embeddings.
        text_emb: ``(N_txt, D)`` caption embeddings.
        text_to_image: ``LongTensor (N_txt,)``, the image each caption describes; every image
            needs at least one caption.
        ks: the k values for recall.
        chunk_size: queries scored at once.

    Returns:
        ``{"text_to_image/R@1": ..., "text_to_image/median_rank": ..., "image_to_text/R@1": ..., ...}``.
    """
    text_to_image = torch.as_tensor(text_to_image)
    if text_to_image.ndim != 1 or not _is_integer(text_to_image):
        raise ValueError(
            f"text_to_image must be integer image indices of shape (N_txt,), got "
            f"{text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    num_images = image_emb.shape[0] if isinstance(image_emb, torch.Tensor) else 0
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(
            f"text_to_image must lie in [0, {num_images}), got "
            f"{text_to_image.min().item()}..{text_to_image.max().item()}"
        )
    captions: list[list[int]] = [[] for _ in range(num_images)]
    for t, i in enumerate(text_to_image.tolist()):
        captions[i].append(t)
    orphans = [i for i, c in enumerate(captions) if not c]
    if orphans:
        raise ValueError(
            f"images {orphans[:10]} have no caption in text_to_image ({len(orphans)} in all); "
            "drop them before computing image-to-text retrieval"
        )
    out = {}
    t2i = retrieval_metrics(text_emb, image_emb, text_to_image, ks=ks, chunk_size=chunk_size)
    out.update({f"text_to_image/{k}": v for k, v in t2i.items()})
    i2t = retrieval_metrics(image_emb, text_emb, captions, ks=ks, chunk_size=chunk_size)
    out.update({f"image_to_text/{k}": v for k, v in i2t.items()})
    return out
