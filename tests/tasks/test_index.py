"""Embedding index: exact search against a brute-force sort, save/load, model checks, and the FAISS backend."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from polymodal.datasets import SkippedSample
from polymodal.tasks.index import EMBEDDINGS_FILE, INDEX_FILE, EmbeddingIndex, IndexMismatchError, model_identity
from polymodal.tasks.vector_search import FaissSearcher, exact_search, overlap_at_k


def brute_force(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full score matrix sorted per row: score descending, then corpus index ascending (a stable sort)."""
    scores = queries.double() @ corpus.double().T
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


class StubModel(nn.Module):
    """A two-tower stand-in: images are flattened through a linear map, texts are mean token embeddings."""

    def __init__(self, dim: int = 8, pixels: int = 12, name: str = "stub", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(pixels, dim)
        self.text = nn.Embedding(64, dim)
        cfg = {"name": name, "dim": dim, "pixels": pixels}
        self.config = SimpleNamespace(to_dict=lambda: cfg)

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        e = self.image(x.flatten(1).to(self.image.weight.dtype))
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        e = self.text(tokens).mean(1)
        return F.normalize(e, dim=-1) if normalize else e


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(c) % 64 for c in t.ljust(10)[:10]] for t in texts])


# ----------------------------------------------------------------------------------------------------
# Exact search


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 99, 100, 101, 4096])
@pytest.mark.parametrize("k", [1, 5, 100])
def test_exact_search_equals_full_sort(chunk_size, k):
    g = torch.Generator().manual_seed(chunk_size * 1000 + k)
    corpus = F.normalize(torch.randn(100, 16, generator=g), dim=1)
    queries = F.normalize(torch.randn(13, 16, generator=g), dim=1)
    scores, indices = exact_search(queries, corpus, k, chunk_size=chunk_size, query_chunk_size=4)
    ref_scores, ref_indices = brute_force(queries, corpus, k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=1e-6)
    assert scores.dtype == torch.float32 and indices.dtype == torch.long


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8, 1000])
def test_ties_go_to_the_lower_index_across_chunk_boundaries(chunk_size):
    # Integer vectors give exact scores and many ties, including ties cut by k and split over chunks.
    g = torch.Generator().manual_seed(chunk_size)
    corpus = torch.randint(-1, 2, (40, 3), generator=g).float()
    queries = torch.randint(-1, 2, (25, 3), generator=g).float()
    for k in (1, 3, 7, 40):
        _, indices = exact_search(queries, corpus, k, chunk_size=chunk_size, query_chunk_size=6)
        assert torch.equal(indices, brute_force(queries, corpus, k)[1]), k


@pytest.mark.parametrize("chunk_size", [700, 1000, 2999, 3000])
def test_grouped_top_k_of_wide_chunks_is_exact(chunk_size):
    # Chunks this wide take the two-stage path (group maxima, then the best groups' items, skipping groups
    # that cannot beat the running k-th score); integer vectors make ties at every stage.
    g = torch.Generator().manual_seed(chunk_size)
    for corpus, queries in (
        (F.normalize(torch.randn(3000, 16, generator=g), dim=1), F.normalize(torch.randn(25, 16, generator=g), dim=1)),
        (torch.randint(-1, 2, (3000, 3), generator=g).float(), torch.randint(-1, 2, (25, 3), generator=g).float()),
        (torch.randint(-2, 3, (3000, 6), generator=g).float(), torch.randint(-2, 3, (25, 6), generator=g).float()),
    ):
        for k in (1, 7, 10, 40):
            scores, indices = exact_search(queries, corpus, k, chunk_size=chunk_size, query_chunk_size=10)
            ref_scores, ref_indices = brute_force(queries, corpus, k)
            assert torch.equal(indices, ref_indices), k
            torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=1e-6)


def test_identical_items_return_the_first_ones():
    corpus = torch.zeros(10, 2)
    corpus[:, 0] = 1.0
    corpus[3] = torch.tensor([0.0, 1.0])  # the only different item
    scores, indices = exact_search(torch.tensor([[1.0, 0.0]]), corpus, 4, chunk_size=3)
    assert indices.tolist() == [[0, 1, 2, 4]]
    assert scores.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_exact_search_checks_its_inputs():
    corpus = torch.randn(5, 4)
    scores, indices = exact_search(torch.randn(2, 4), corpus, 10)
    assert indices.shape == (2, 5) and sorted(indices[0].tolist()) == list(range(5))  # k above N gives N
    for bad_k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            exact_search(torch.randn(2, 4), corpus, bad_k)
    with pytest.raises(ValueError, match="embedding size 3, expected 4"):
        exact_search(torch.randn(2, 3), corpus, 1)
    with pytest.raises(ValueError, match="NaN"):
        exact_search(torch.full((1, 4), float("nan")), corpus, 1)
    opposite = torch.randn(5, 4)
    opposite[1, 2], opposite[3, 0] = float("inf"), float("-inf")  # they sum to NaN
    with pytest.raises(ValueError, match="corpus holds NaN or infinite"):
        exact_search(torch.randn(2, 4), opposite, 1)
    huge = torch.full((5, 4), 3e38)  # finite, though its sum overflows
    assert exact_search(torch.ones(1, 4), huge, 2)[1].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="chunk_size"):
        exact_search(torch.randn(2, 4), corpus, 1, chunk_size=0)


def test_overlap_at_k():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert overlap_at_k(torch.tensor([[4, 3, 2, 1], [5, 9, 9, 9]]), ref) == pytest.approx(5 / 8)


# ----------------------------------------------------------------------------------------------------
# The index


def random_index(n: int = 50, dim: int = 8, **kwargs) -> EmbeddingIndex:
    emb = torch.randn(n, dim)
    info = {"name": "raw", "modality": "image"}
    return EmbeddingIndex(emb, [f"item{i}" for i in range(n)], info, [{"i": i} for i in range(n)], **kwargs)


def test_index_normalises_and_searches_by_embedding():
    index = random_index()
    assert index.embeddings.dtype == torch.float32
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(50))
    queries = torch.randn(3, 8) * 5  # unnormalised queries are normalised
    result = index.search(queries, k=4)
    ref_scores, ref_indices = brute_force(F.normalize(queries, dim=1), index.embeddings, 4)
    assert torch.equal(result.indices, ref_indices)
    torch.testing.assert_close(result.scores.double(), ref_scores, rtol=0, atol=1e-6)
    assert result.ids[1] == [f"item{i}" for i in ref_indices[1].tolist()]
    assert result.metadata[2][0] == {"i": ref_indices[2, 0].item()}
    one = index.search(queries[0], k=2)  # a single (D,) query
    assert torch.equal(one.indices, ref_indices[:1, :2])


def test_index_rejects_bad_input():
    with pytest.raises(ValueError, match="all-zero"):
        EmbeddingIndex(torch.zeros(2, 3), ["a", "b"], {"modality": "image"})
    with pytest.raises(ValueError, match="2 ids for 3"):
        EmbeddingIndex(torch.randn(3, 3), ["a", "b"], {"modality": "image"})
    with pytest.raises(ValueError, match="JSON-able"):
        EmbeddingIndex(torch.randn(1, 3), ["a"], {"modality": "image"}, [{"x": object()}])
    index = random_index()
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.randn(1, 8), k=0)
    with pytest.raises(IndexMismatchError, match="size 5 but this index holds size-8"):
        index.search(torch.randn(1, 5))


def test_save_load_round_trip(tmp_path):
    index = random_index(n=30)
    index.model_info["source"] = "/somewhere/model"
    index.metadata[0]["nested"] = {"shapes": [{"colour": "red"}], "unseen": True}
    out = index.save(tmp_path / "idx")
    assert sorted(os.listdir(out)) == [EMBEDDINGS_FILE, INDEX_FILE]
    assert os.listdir(tmp_path) == ["idx"]  # no temporary directory left behind
    again = EmbeddingIndex.load(out)
    assert torch.equal(again.embeddings, index.embeddings)
    assert again.ids == index.ids and again.metadata == index.metadata
    assert again.model_info == index.model_info and again.model_info["embed_dim"] == 8
    q = torch.randn(4, 8)
    assert torch.equal(again.search(q, 5).indices, index.search(q, 5).indices)


def test_save_never_overwrites_unless_asked(tmp_path):
    first, second = random_index(n=5), random_index(n=7)
    first.save(tmp_path / "idx")
    with pytest.raises(FileExistsError, match="already exists"):
        second.save(tmp_path / "idx")
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 5
    second.save(tmp_path / "idx", overwrite=True)
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 7
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an index"):
        second.save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["idx", "notes"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        random_index().save(tmp_path / "idx")
    assert os.listdir(tmp_path) == []


def test_load_rejects_damaged_indexes(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddingIndex.load(tmp_path / "missing")
    random_index(n=6).save(tmp_path / "idx")
    header = json.loads((tmp_path / "idx" / INDEX_FILE).read_text())
    header["num_items"] = 7
    (tmp_path / "idx" / INDEX_FILE).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="6 ids and 6 metadata for 7 items"):
        EmbeddingIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EmbeddingIndex.load(tmp_path / "idx")


# ----------------------------------------------------------------------------------------------------
# Building from models


def test_from_dataset_embeds_in_batches_and_skips_bad_items():
    model = StubModel()
    images = torch.randn(11, 3, 2, 2)
    items = [{"image": images[i], "meta": {"path": f"p{i}.png", "caption": f"c{i}"}} for i in range(11)]
    items.insert(4, SkippedSample("corrupt_image", "p_bad.png"))
    index = EmbeddingIndex.from_dataset(model, items, "image", batch_size=3, progress=False)
    assert index.skipped == 1 and len(index) == 11
    with torch.no_grad():
        expected = F.normalize(model.image(images.flatten(1)), dim=1)
    torch.testing.assert_close(index.embeddings, expected)
    assert index.ids == [f"p{i}.png" for i in range(11)]
    assert index.metadata[3] == {"path": "p3.png", "caption": "c3"}
    assert index.model_info["modality"] == "image" and index.model_info["embed_dim"] == 8
    with pytest.raises(ValueError, match="no usable image items"):
        EmbeddingIndex.from_dataset(model, [SkippedSample("corrupt_image", "x")], progress=False)


def test_from_files_reads_images_and_names_bad_ones(tmp_path):
    model = StubModel(pixels=12)
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).flatten() / 255  # noqa: E731
    paths = []
    for i in range(4):
        Image.new("RGB", (2, 2), (60 * i, 10, 200 - 40 * i)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    index = EmbeddingIndex.from_files(model, paths, to_tensor, batch_size=3, progress=False)
    with torch.no_grad():
        direct = model.encode_image(torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in paths]), True)
    torch.testing.assert_close(index.embeddings, direct)
    assert index.ids == [str(p) for p in paths]
    with pytest.raises(FileNotFoundError, match="do not exist"):
        EmbeddingIndex.from_files(model, [*paths, tmp_path / "nope.png"], to_tensor, progress=False)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png is not a readable image"):
        EmbeddingIndex.from_files(model, [*paths, tmp_path / "junk.png"], to_tensor, progress=False)


def test_text_search_matches_embedding_search_and_texts_index():
    model = StubModel()
    images = torch.randn(20, 12)
    index = EmbeddingIndex.from_dataset(model, [{"image": x} for x in images], progress=False)
    texts = ["a red circle", "blue square"]
    with torch.no_grad():
        queries = model.encode_text(tokenize(texts), normalize=True)
    by_text = index.search_text(model, tokenize, texts, k=5)
    assert torch.equal(by_text.indices, index.search(queries, k=5).indices)
    assert by_text.ids[0] == [str(i) for i in by_text.indices[0].tolist()]  # ids default to positions
    captions = EmbeddingIndex.from_texts(model, ["one", "two", "three"], tokenize, progress=False)
    hit = captions.search_image(model, images[0].reshape(3, 2, 2), k=1)
    with torch.no_grad():
        emb = model.encode_image(images[:1], normalize=True) @ captions.embeddings.T
    assert hit.ids[0] == [["one", "two", "three"][emb.argmax().item()]]
    assert captions.metadata[1] == {"text": "two"}


def test_queries_from_another_model_are_refused():
    model = StubModel(seed=0)
    index = EmbeddingIndex.from_dataset(model, [{"image": torch.randn(12)} for _ in range(5)], progress=False)
    index.search_text(model, tokenize, "fine", k=2)
    index.search_text(model.to(torch.bfloat16), tokenize, "same weights in bfloat16", k=2)
    model.float()
    with pytest.raises(IndexMismatchError, match="weights fingerprint"):
        index.search_text(StubModel(seed=1), tokenize, "other weights", k=2)
    with pytest.raises(IndexMismatchError, match="config fingerprint"):
        index.search_text(StubModel(dim=6), tokenize, "other config", k=2)
    assert model_identity(model, "image") == {k: v for k, v in index.model_info.items() if k != "embed_dim"}


# ----------------------------------------------------------------------------------------------------
# FAISS


def clustered(n: int, dim: int, seed: int, centres: int = 500) -> torch.Tensor:
    """Points around random centres, as real embeddings are (uniform random points have no neighbours to find)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g)
    x = c[torch.randint(0, centres, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1)


@pytest.mark.slow
def test_faiss_ivf_recall_on_100k_vectors(tmp_path):
    corpus = clustered(100_000, 64, seed=0)
    g = torch.Generator().manual_seed(1)  # queries: corpus items moved a little
    queries = F.normalize(corpus[torch.randperm(100_000, generator=g)[:500]] + 0.3 * torch.randn(500, 64, generator=g))
    index = EmbeddingIndex(corpus, [str(i) for i in range(100_000)], {"modality": "image"}, backend="faiss")
    recall = index.faiss_recall(queries, k=10)
    assert recall >= 0.95, recall
    # the helper agrees with a direct comparison of the two backends
    approx = index.search(queries, 10).indices
    index.set_backend("exact")
    exact = index.search(queries, 10).indices
    assert overlap_at_k(approx, exact) == pytest.approx(recall)


def test_faiss_flat_equals_exact_and_survives_save_load(tmp_path):
    corpus = torch.randn(300, 16)
    queries = torch.randn(20, 16)
    index = random_index(n=300, dim=16, backend="faiss", faiss_kind="flat")
    index.embeddings = F.normalize(corpus, dim=1)
    faiss_result = index.search(queries, 7)
    index.set_backend("exact")
    exact_result = index.search(queries, 7)
    assert torch.equal(faiss_result.indices, exact_result.indices)
    torch.testing.assert_close(faiss_result.scores, exact_result.scores, rtol=0, atol=1e-5)
    index.set_backend("faiss", "hnsw", {"m": 16, "ef_search": 64})
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "faiss.index").is_file()
    again = EmbeddingIndex.load(tmp_path / "idx")
    assert again.backend == "faiss" and again.faiss_kind == "hnsw" and again.faiss_params["m"] == 16
    assert torch.equal(again.search(queries, 7).indices, index.search(queries, 7).indices)
    assert again.faiss_recall(queries, k=7) >= 0.9


def test_faiss_rejects_bad_parameters():
    emb = torch.randn(100, 8)
    with pytest.raises(ValueError, match="unknown hnsw FAISS parameters"):
        FaissSearcher(emb, "hnsw", {"nprobe": 3})
    with pytest.raises(ValueError, match="unknown FAISS index kind"):
        FaissSearcher(emb, "lsh")
    with pytest.raises(ValueError, match="exceeds the number of vectors"):
        FaissSearcher(emb, "ivf", {"nlist": 500})
    searcher = FaissSearcher(emb, "ivf", {"nlist": 2, "nprobe": 2})
    assert isinstance(searcher.index, faiss.IndexIVFFlat) and len(searcher) == 100
