"""Top-k search over a corpus of embeddings: exact (chunked matrix products) and approximate (FAISS).

Scores are inner products, i.e. cosine similarities for L2-normalised embeddings. Exact search
walks the corpus ``chunk_size`` rows at a time and the queries ``query_chunk_size`` rows at a time,
keeping a running top-k per query, so memory stays at about ``query_chunk_size * chunk_size``
floats however large the corpus is; the full ``(queries, corpus)`` score matrix never exists.

Ties: results are ordered by score, highest first, and items with equal scores by their corpus
index, lowest first, exactly as a stable sort of the full score matrix would order them; chunk
boundaries never change which of several tied items is returned.

FAISS (``pip install "polymodal[faiss]"``) is imported only when a ``FaissSearcher`` is built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FAISS_KINDS", "FaissSearcher", "check_embeddings", "exact_search", "overlap_at_k"]

FAISS_KINDS = ("flat", "hnsw", "ivf")


GROUP = 32  # corpus columns per group in the two-stage top-k of a score block


def check_embeddings(x: Any, name: str, dim: int | None = None) -> torch.Tensor:
    """``x`` as a finite floating ``(N, D)`` tensor, or a ``ValueError`` naming ``name`` and what was expected."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.dtype.is_floating_point:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, (torch.Tensor, np.ndarray)) else type(x).__name__
        raise ValueError(f"{name} must be a floating (N, D) tensor, got {got}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has embedding size {x.shape[1]}, expected {dim} (the index's embedding size)")
    # A finite sum means every value is finite (NaN and infinities carry into the sum); only when it is
    # not (or the sum overflowed) is the exact, much slower element-wise check needed.
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer (the number of results per query), got {k!r}")
    return int(k)


def _order(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` candidates per row by (score descending, index ascending)."""
    by_index = indices.argsort(dim=1)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    # A stable sort keeps the ascending index order among equal scores.
    by_score = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _chunk_top(
    scores: torch.Tensor, k: int, floor: torch.Tensor | None = None, group: int = GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best columns of each row of a ``(q, C)`` score block that can still enter the running top-k
    (in no particular order), ties at the k-th place going to the lower column.

    ``floor`` is each row's k-th best score so far, from earlier chunks with lower indices: an item must
    beat it strictly to enter. When the block is wide, its columns are cut into groups of ``group``;
    the k best items lie in the k groups with the highest maxima, and only groups whose maximum beats
    the floor matter, so only those groups' items are ranked: one pass over the block for the group
    maxima instead of a top-k over all of it. Rows where that choice is contested (equal group maxima,
    or equal scores, at the k-th place) are ranked in full. Returns up to ``k`` columns per row.
    """
    rows, width = scores.shape
    if width <= k:
        return scores, torch.arange(width, device=scores.device).expand_as(scores)
    full = width // group * group
    floor = scores.new_full((rows,), -math.inf) if floor is None else floor
    if full // group <= 2 * (k + 1):  # too few groups to leave any out: a plain top-k
        candidates = None
        values, columns = scores.topk(k + 1, dim=1)
        tied = values[:, k] == values[:, k - 1]
    else:
        maxima = scores[:, :full].view(rows, full // group, group).amax(dim=2)
        take = min(k, int((maxima > floor[:, None]).sum(dim=1).max()))  # groups that may beat the floor
        top_maxima, top_groups = maxima.topk(take + 1, dim=1)
        # A group left out can matter only if its maximum beats the floor and equals the last one taken.
        excluded = top_maxima[:, take]
        tied = (excluded > floor) & (excluded == top_maxima[:, take - 1]) if take else excluded > floor
        offsets = torch.arange(group, device=scores.device)
        candidates = (top_groups[:, :take, None] * group + offsets).reshape(rows, take * group)
        if full < width:  # the ragged tail is always a candidate
            tail = torch.arange(full, width, device=scores.device).expand(rows, -1)
            candidates = torch.cat([candidates, tail], dim=1)
        if candidates.shape[1] <= k:
            values, columns = scores.gather(1, candidates), candidates
        else:
            values, picked = scores.gather(1, candidates).topk(k + 1, dim=1)
            columns = candidates.gather(1, picked)
            tied |= (values[:, k] > floor) & (values[:, k] == values[:, k - 1])
    if not tied.any():
        return values[:, :k], columns[:, :k]
    if values.shape[1] < k:  # fewer candidates than places, yet contested (rare): rank the whole block
        order = scores.sort(dim=1, descending=True, stable=True)
        return order.values[:, :k], order.indices[:, :k]
    values, columns = values[:, :k].clone(), columns[:, :k].clone()
    contested = tied.nonzero().squeeze(1)
    order = scores[contested].sort(dim=1, descending=True, stable=True)
    values[contested], columns[contested] = order.values[:, :k], order.indices[:, :k]
    return values, columns


def exact_search(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    chunk_size: int = 8192,
    query_chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring corpus rows for every query, by inner product.

    Args:
        queries: ``(Q, D)`` query embeddings.
        corpus: ``(N, D)`` corpus embeddings; the search runs on its device, in float32.
        k: results per query; at most ``N`` are returned.
        chunk_size: corpus rows scored at once.
        query_chunk_size: queries scored at once.

    Returns:
        ``(scores, indices)``, both ``(Q, min(k, N))``: float32 scores, highest first, and the corpus
        rows they belong to (int64); equal scores are ordered by corpus row, lowest first.
    """
    k = _check_k(k)
    for name, value in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    corpus = check_embeddings(corpus, "corpus")
    queries = check_embeddings(queries, "queries", dim=corpus.shape[1])
    if corpus.shape[0] == 0:
        raise ValueError("the corpus is empty; there is nothing to search")
    device = corpus.device
    corpus = corpus.float()
    k = min(k, corpus.shape[0])
    num_queries = queries.shape[0]
    out_scores = torch.empty(num_queries, k, device=device)
    out_indices = torch.empty(num_queries, k, dtype=torch.long, device=device)
    # One score buffer for all blocks: a fresh (q, C) tensor per chunk costs page faults that add about
    # a fifth to the matrix products' time on a CPU.
    buffer = torch.empty(min(query_chunk_size, num_queries) * min(chunk_size, corpus.shape[0]), device=device)
    with torch.no_grad():
        for q0 in range(0, num_queries, query_chunk_size):
            block = queries[q0 : q0 + query_chunk_size].to(device=device, dtype=torch.float32)
            best_scores = block.new_empty(block.shape[0], 0)
            best_indices = torch.empty(block.shape[0], 0, dtype=torch.long, device=device)
            for c0 in range(0, corpus.shape[0], chunk_size):
                part = corpus[c0 : c0 + chunk_size]
                scores = buffer[: block.shape[0] * part.shape[0]].view(block.shape[0], part.shape[0])
                torch.mm(block, part.T, out=scores)  # (q, C)
                floor = best_scores[:, k - 1] if best_scores.shape[1] == k else None
                values, columns = _chunk_top(scores, k, floor)
                if values.shape[1] == 0:
                    continue
                # Earlier chunks hold lower indices, so concatenating keeps index order among equal scores.
                merged_scores = torch.cat([best_scores, values], dim=1)
                merged_indices = torch.cat([best_indices, columns + c0], dim=1)
                best_scores, best_indices = _order(merged_scores, merged_indices, k)
            out_scores[q0 : q0 + block.shape[0]] = best_scores
            out_indices[q0 : q0 + block.shape[0]] = best_indices
    return out_scores, out_indices


def overlap_at_k(found: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean share of each row of ``reference`` (the true top-k indices) that ``found`` also holds."""
    if found.shape != reference.shape:
        raise ValueError(f"found {tuple(found.shape)} and reference {tuple(reference.shape)} must have the same shape")
    if reference.numel() == 0:
        raise ValueError("no results to compare")
    hits = (found.unsqueeze(2) == reference.unsqueeze(1)).any(dim=1)  # (Q, k): reference item found
    return hits.double().mean().item()


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            'backend="faiss" needs the faiss package: pip install "polymodal[faiss]" (or faiss-cpu / faiss-gpu)'
        ) from err
    return faiss


class FaissSearcher:
    """An approximate (or, with ``kind="flat"``, exact) FAISS inner-product index over fixed embeddings.

    Args:
        embeddings: ``(N, D)`` corpus embeddings (converted to float32 numpy).
        kind: ``"hnsw"`` (graph; no training, slower to build), ``"ivf"`` (inverted lists over k-means
            cells; fast to build) or ``"flat"`` (exact, brute force).
        params: ``hnsw``: ``m`` (links per node, 32), ``ef_construction`` (80), ``ef_search`` (128);
            ``ivf``: ``nlist`` (cells, about ``sqrt(N)``), ``nprobe`` (cells searched, ``nlist / 6``). The
            defaults reach recall@10 of about 0.98 on 100k clustered vectors; check yours with
            ``EmbeddingIndex.faiss_recall`` and raise ``nprobe`` (or ``ef_search``) if it is too low.
            Unknown keys are an error.
    """

    def __init__(self, embeddings: torch.Tensor, kind: str = "ivf", params: Mapping[str, int] | None = None) -> None:
        faiss = _import_faiss()
        embeddings = check_embeddings(embeddings, "embeddings")
        if kind not in FAISS_KINDS:
            raise ValueError(f"unknown FAISS index kind {kind!r}; expected one of {FAISS_KINDS}")
        self.kind = kind
        self.params = self._resolve_params(kind, dict(params or {}), embeddings.shape[0])
        self.dim = embeddings.shape[1]
        data = np.ascontiguousarray(embeddings.detach().float().cpu().numpy())
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.params["m"], metric)
            index.hnsw.efConstruction = self.params["ef_construction"]
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.params["nlist"], metric)
            index.train(data)
        index.add(data)
        self.index = index
        self._apply_search_params()

    @staticmethod
    def _resolve_params(kind: str, params: dict[str, int], n: int) -> dict[str, int]:
        if kind == "hnsw":
            defaults = {"m": 32, "ef_construction": 80, "ef_search": 128}
        elif kind == "ivf":
            nlist = max(1, min(round(math.sqrt(n)), n // 39))  # faiss wants ~39 training points per cell
            nlist = params.get("nlist", nlist)
            defaults = {"nlist": nlist, "nprobe": max(1, math.ceil(nlist / 6))}
        else:
            defaults = {}
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {kind} FAISS parameters {unknown}; expected some of {sorted(defaults)}")
        resolved = {**defaults, **params}
        bad = {key: v for key, v in resolved.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"FAISS parameters must be positive integers, got {bad}")
        if kind == "ivf" and resolved["nlist"] > n:
            raise ValueError(f"ivf nlist={resolved['nlist']} exceeds the number of vectors {n}")
        return resolved

    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"]
        elif self.kind == "ivf":
            self.index.nprobe = min(self.params["nprobe"], self.params["nlist"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, indices)``, both ``(Q, min(k, N))``; a slot FAISS could not fill has index -1 and score -inf."""
        k = min(_check_k(k), len(self))
        queries = check_embeddings(queries, "queries", dim=self.dim)
        scores, indices = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
        return scores.masked_fill(indices < 0, float("-inf")), indices

    def save(self, path: str | os.PathLike) -> None:
        """Write the FAISS index to ``path`` (FAISS's own binary format)."""
        _import_faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str, params: Mapping[str, int], dim: int, count: int) -> FaissSearcher:
        """Read an index written by ``save``, checking it holds ``count`` vectors of size ``dim``."""
        faiss = _import_faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index file {path} does not exist")
        index = faiss.read_index(str(path))
        if index.d != dim or index.ntotal != count:
            raise ValueError(
                f"FAISS index file {path} holds {index.ntotal} vectors of size {index.d}, but the embeddings are "
                f"{count} x {dim}; it belongs to another index"
            )
        self = cls.__new__(cls)
        self.kind, self.params, self.dim, self.index = kind, dict(params), dim, index
        self._apply_search_params()
        return self
