"""An embedding index: a corpus embedded by one tower of a contrastive model, saved to disk and searched.

``EmbeddingIndex`` holds float32 L2-normalised embeddings ``(N, D)``, an id per item (a file path,
a caption, ...), JSON-able metadata per item and the identity of the model that embedded them (its
config name, a fingerprint of its config and of its weights, the embedding size and the tower).
Queries embedded by another model are refused: their scores would be meaningless.

On disk an index is a directory holding ``embeddings.safetensors`` and ``index.json`` (plus
``faiss.index`` for the FAISS backend), written into a temporary directory and renamed into place.

Nothing here depends on a particular model class: any object with ``encode_<modality>(x,
normalize=True)`` works, and a ``config`` with ``to_dict()`` (as polymodal models have) identifies it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polymodal.fileio import OutputExistsError, atomic_directory

from .embedding import embed_dataset, encoder_for, eval_mode, model_device
from .model_identity import model_identity
from .vector_search import FAISS_KINDS, FaissSearcher, check_embeddings, exact_search, overlap_at_k

__all__ = [
    "EMBEDDINGS_FILE",
    "INDEX_FILE",
    "EmbeddingIndex",
    "IndexMismatchError",
    "SearchResult",
    "model_identity",
]

INDEX_FORMAT = "polymodal-embedding-index"
INDEX_VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.json"
FAISS_FILE = "faiss.index"
BACKENDS = ("exact", "faiss")


class IndexMismatchError(ValueError):
    """A query model (or query embedding) that does not fit the model an index was built with."""


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with tensors and numpy values turned into plain Python, checked to survive JSON."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, Path):
        value = str(value)
    elif isinstance(value, Mapping):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if not isinstance(value, (str, int, float, bool, type(None), list)):
        raise ValueError(f"{where}: metadata must be JSON-able, got a {type(value).__name__}: {value!r:.80}")
    return value


@dataclass
class SearchResult:
    """The top-k items of each query.

    Attributes:
        scores: ``(Q, k)`` cosine similarities, highest first.
        indices: ``(Q, k)`` positions in the index (-1 where an approximate backend found fewer than k).
        ids: per query, the ids of its results.
        metadata: per query, the metadata of its results.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    ids: list[list[str]]
    metadata: list[list[dict]]

    def __len__(self) -> int:
        return self.scores.shape[0]


class _Files(torch.utils.data.Dataset):
    """Files decoded and transformed one by one; a file that cannot be read is an error naming it."""

    def __init__(self, files: Sequence[Path], decode: Callable[[Path], Any], transform: Callable, modality: str):
        self.files, self.decode, self.transform, self.modality = files, decode, transform, modality

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        try:
            value = self.transform(self.decode(path))
        except Exception as err:  # any decoder's error; re-raised naming the file
            detail = getattr(err, "detail", None) or f"{type(err).__name__}: {err}"
            raise ValueError(f"{path} is not a readable {self.modality} file ({detail})") from err
        return {self.modality: value, "meta": {"path": str(path)}}


def _decode_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _as_list(items: Sequence[Any]) -> list:
    return items


class _StackItems:
    """``embed_dataset``'s ``batch_fn`` for lists of dataset items: stacks the ``modality`` entries of the
    dict items, leaves out (and counts) the others (``SkippedSample``), and records each item's id."""

    def __init__(self, modality: str, id_key: str) -> None:
        self.modality, self.id_key = modality, id_key
        self.ids: list[str] = []
        self.skipped = 0

    def __call__(self, items: list[Any]) -> tuple[torch.Tensor, None, list[dict]]:
        good = [it for it in items if isinstance(it, Mapping)]
        self.skipped += len(items) - len(good)
        if not good:
            return torch.empty(0), None, []
        seen = len(self.ids)
        missing = [seen + j for j, it in enumerate(good) if self.modality not in it]
        if missing:
            raise ValueError(f"dataset items {missing[:5]} have no {self.modality!r} entry; keys: {sorted(good[0])}")
        meta = [dict(it.get("meta") or {}) for it in good]
        self.ids += [str(m.get(self.id_key, seen + j)) for j, m in enumerate(meta)]
        return torch.stack([torch.as_tensor(it[self.modality]) for it in good]), None, meta


class EmbeddingIndex:
    """Embeddings of a corpus with ids, metadata and the identity of the model that made them.

    Build one with ``from_dataset``, ``from_files`` or ``from_texts``; search it with ``search``
    (embeddings), ``search_text``, ``search_image`` or ``search_inputs``; ``save`` / ``load`` it.

    Args:
        embeddings: ``(N, D)`` embeddings; stored as float32 and L2-normalised.
        ids: one string per item.
        model_info: the identity of the model (see ``model_identity``); ``embed_dim`` is set to ``D``.
        metadata: one JSON-able dict per item (default empty dicts).
        backend: ``"exact"`` (chunked matrix products) or ``"faiss"`` (approximate, for large corpora).
        faiss_kind: ``"ivf"``, ``"hnsw"`` or ``"flat"`` (see ``FaissSearcher``).
        faiss_params: FAISS parameters (see ``FaissSearcher``).
        chunk_size: corpus rows scored at once by exact search; memory is about ``1024 * chunk_size`` floats.
        normalize: L2-normalise the embeddings; ``False`` keeps them bit for bit (they must be normalised already).
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[str],
        model_info: Mapping[str, Any],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        backend: str = "exact",
        faiss_kind: str = "ivf",
        faiss_params: Mapping[str, int] | None = None,
        chunk_size: int = 8192,
        normalize: bool = True,
    ) -> None:
        embeddings = check_embeddings(embeddings, "embeddings").detach().float()
        if embeddings.shape[0] == 0:
            raise ValueError("an index needs at least one item; got no embeddings")
        norms = embeddings.norm(dim=1)
        if (norms == 0).any():
            raise ValueError(f"items {norms.eq(0).nonzero().squeeze(1).tolist()[:10]} have all-zero embeddings")
        if normalize:
            embeddings = embeddings / norms.unsqueeze(1)
        elif not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError("embeddings are not L2-normalised; pass normalize=True")
        self.embeddings = embeddings
        self.ids = [str(i) for i in ids]
        if len(self.ids) != len(self):
            raise ValueError(f"got {len(self.ids)} ids for {len(self)} embeddings")
        metadata = [{} for _ in self.ids] if metadata is None else list(metadata)
        if len(metadata) != len(self):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(self)} embeddings")
        self.metadata = [_jsonable(dict(m), f"metadata of item {i}") for i, m in enumerate(metadata)]
        if "modality" not in model_info:
            raise ValueError("model_info must name the modality the index holds (see model_identity)")
        self.model_info = {**_jsonable(dict(model_info), "model_info"), "embed_dim": self.dim}
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.skipped = 0  # items a dataset could not provide (set by from_dataset)
        self._faiss: FaissSearcher | None = None
        self.set_backend(backend, faiss_kind, faiss_params)

    # ------------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def from_dataset(
        cls,
        model: Any,
        dataset: Iterable[Any],
        modality: str = "image",
        batch_size: int = 64,
        id_key: str = "path",
        device: torch.device | str | None = None,
        num_workers: int = 0,
        progress: bool = True,
        **kwargs: Any,
    ) -> EmbeddingIndex:
        """Embed every item of a dataset with the model's ``modality`` tower.

        Args:
            model: anything with ``encode_<modality>(x, normalize=True)``.
            dataset: items ``{modality: tensor, "meta": {...}}`` (as polymodal datasets give); items
                that are not dicts (``SkippedSample``) are left out and counted in ``self.skipped``.
            modality: which tower embeds the items.
            batch_size: items per forward pass.
            id_key: meta key used as each item's id (its position in the dataset when absent).
            device: where to run the model; default the model's device.
            num_workers: DataLoader worker processes.
            progress: show a progress bar.
            **kwargs: passed on to the constructor (``backend``, ``faiss_kind``, ...).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list, shuffle=False
        )
        items = _StackItems(modality, id_key)
        data = embed_dataset(model, loader, modality, batch_fn=items, device=device, progress=progress, desc="index")
        if len(data) == 0:
            raise ValueError(f"the dataset yielded no usable {modality} items ({items.skipped} skipped)")
        info = model_identity(model, modality)
        index = cls(data.features, items.ids, info, data.meta, **kwargs)
        index.skipped = items.skipped
        return index

    @classmethod
    def from_files(
        cls,
        model: Any,
        files: Sequence[str | os.PathLike],
        transform: Callable[[Any], torch.Tensor],
        modality: str = "image",
        decode: Callable[[Path], Any] | None = None,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> EmbeddingIndex:
        """Embed files (images by default); ids are the paths as given.

        Args:
            model: anything with ``encode_<modality>(x, normalize=True)``.
            files: file paths; every one must exist (checked before anything is embedded).
            transform: decoded file -> model input tensor, e.g. ``polymodal.get_preprocess(model, "image")``.
            modality: which tower embeds the files.
            decode: path -> decoded file; default opens images with PIL as RGB (required for other modalities).
            batch_size: files per forward pass.
            **kwargs: passed on to ``from_dataset`` (``device``, ``progress``, ``backend``, ...).
        """
        paths = [Path(f) for f in files]
        if not paths:
            raise ValueError("no files to index")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) do not exist: {missing[:5]}")
        if decode is None:
            if modality != "image":
                raise ValueError(f"pass decode= to read {modality} files; only images have a default decoder")
            decode = _decode_rgb
        dataset = _Files(paths, decode, transform, modality)
        return cls.from_dataset(model, dataset, modality, batch_size=batch_size, id_key="path", **kwargs)

    @classmethod
    def from_texts(
        cls,
        model: Any,
        texts: Sequence[str],
        tokenizer: Callable[[list[str]], torch.Tensor],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> EmbeddingIndex:
        """Embed texts (captions, labels) with the text tower; ids are the texts themselves.

        Args:
            model: anything with ``encode_text(tokens, normalize=True)``.
            texts: non-empty strings.
            tokenizer: list of strings -> ``LongTensor (B, L)``.
            metadata: one dict per text, merged over ``{"text": text}``.
            batch_size: texts per forward pass.
            **kwargs: passed on to ``from_dataset``.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        bad = [(i, t) for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"texts must be non-empty strings; got {bad[:5]} (index, value)")
        if metadata is not None and len(metadata) != len(texts):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(texts)} texts")
        tokens = tokenizer(list(texts))  # (N, L)
        items = [
            {"text": tokens[i], "meta": {"text": t, **(dict(metadata[i]) if metadata is not None else {})}}
            for i, t in enumerate(texts)
        ]
        return cls.from_dataset(model, items, "text", batch_size=batch_size, id_key="text", **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Properties and backends

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __repr__(self) -> str:
        info = self.model_info
        return (
            f"EmbeddingIndex({len(self)} {info['modality']} items, dim {self.dim}, model {info.get('name')!r}, "
            f"backend {self.backend!r})"
        )

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def modality(self) -> str:
        return self.model_info["modality"]

    def to(self, device: torch.device | str) -> EmbeddingIndex:
        """Move the embeddings (and so exact search) to ``device``; returns ``self``."""
        self.embeddings = self.embeddings.to(device)
        return self

    def set_backend(self, backend: str, faiss_kind: str = "ivf", faiss_params: Mapping[str, int] | None = None) -> None:
        """Choose exact search or FAISS; a FAISS index is built on the first search (or ``build_faiss``)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if faiss_kind not in FAISS_KINDS:
            raise ValueError(f"faiss_kind must be one of {FAISS_KINDS}, got {faiss_kind!r}")
        self.backend, self.faiss_kind, self.faiss_params = backend, faiss_kind, dict(faiss_params or {})
        self._faiss = None

    def build_faiss(self) -> FaissSearcher:
        """The FAISS index of the current ``faiss_kind`` and ``faiss_params``, built once."""
        if self._faiss is None:
            self._faiss = FaissSearcher(self.embeddings, self.faiss_kind, self.faiss_params)
            self.faiss_params = dict(self._faiss.params)
        return self._faiss

    def faiss_recall(self, queries: torch.Tensor | None = None, k: int = 10, num_queries: int = 1000) -> float:
        """Recall@k of the FAISS index against exact search: the mean share of the true top-k it returns.

        Args:
            queries: ``(Q, D)`` query embeddings; default ``num_queries`` of the index's own items.
            k: the k of recall@k.
            num_queries: how many items to sample as queries when ``queries`` is not given.
        """
        if queries is None:
            g = torch.Generator().manual_seed(0)
            picks = torch.randperm(len(self), generator=g)[:num_queries]
            queries = self.embeddings[picks.to(self.embeddings.device)]
        queries = self._check_queries(queries)
        _, approximate = self.build_faiss().search(queries, k)
        _, exact = exact_search(queries, self.embeddings, k, self.chunk_size)
        return overlap_at_k(approximate.to(exact.device), exact)

    # ------------------------------------------------------------------------------------------------
    # Searching

    def _check_queries(self, queries: Any) -> torch.Tensor:
        if isinstance(queries, torch.Tensor) and queries.ndim == 1:
            queries = queries.unsqueeze(0)
        if isinstance(queries, torch.Tensor) and queries.ndim == 2 and queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query embeddings have size {queries.shape[1]} but this index holds size-{self.dim} embeddings "
                f"from model {self.model_info.get('name')!r}; query with the model that built the index"
            )
        queries = check_embeddings(queries, "queries", dim=self.dim)
        return F.normalize(queries.float(), dim=1)

    def search(self, queries: torch.Tensor, k: int = 10) -> SearchResult:
        """The ``k`` nearest items to each query embedding (``(Q, D)`` or ``(D,)``; normalised here).

        Returns at most ``len(self)`` results per query, ordered by score; exact search orders equal
        scores by position in the index.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer (the number of results per query), got {k!r}")
        queries = self._check_queries(queries)
        if self.backend == "faiss":
            scores, indices = self.build_faiss().search(queries, k)
        else:
            scores, indices = exact_search(queries, self.embeddings, k, self.chunk_size)
        scores, indices = scores.cpu(), indices.cpu()
        rows = indices.tolist()
        return SearchResult(
            scores=scores,
            indices=indices,
            ids=[[self.ids[i] for i in row if i >= 0] for row in rows],
            metadata=[[self.metadata[i] for i in row if i >= 0] for row in rows],
        )

    def check_model(self, model: Any) -> None:
        """Raise ``IndexMismatchError`` unless ``model`` is the one (same config and weights) that built the index."""
        mine = self.model_info
        theirs = model_identity(model, mine["modality"])
        for key, what in (("config_fingerprint", "config"), ("weights_fingerprint", "weights")):
            if mine.get(key) and theirs.get(key) and mine[key] != theirs[key]:
                raise IndexMismatchError(
                    f"this index was built with model {mine.get('name')!r} ({what} fingerprint {mine[key]}), "
                    f"but the query model is {theirs['name']!r} ({what} fingerprint {theirs[key]}); embeddings "
                    "of different models are not comparable: query with the model that built the index, or "
                    "rebuild the index with this model"
                )

    def search_inputs(self, model: Any, modality: str, inputs: torch.Tensor, k: int = 10) -> SearchResult:
        """Embed a batch of ``modality`` inputs with ``model`` (checked against the index's model) and search."""
        self.check_model(model)
        encode = encoder_for(model, modality)
        device = model_device(model)
        with torch.no_grad(), eval_mode(model):
            queries = encode(inputs.to(device), normalize=True)
        return self.search(queries, k)

    def search_text(
        self, model: Any, tokenizer: Callable[[list[str]], torch.Tensor], texts: str | Sequence[str], k: int = 10
    ) -> SearchResult:
        """Search with one or more texts (a result row per text)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError(f"query texts must be non-empty strings, got {texts!r:.200}")
        return self.search_inputs(model, "text", tokenizer(texts), k)

    def search_image(self, model: Any, images: torch.Tensor, k: int = 10) -> SearchResult:
        """Search with preprocessed images ``(B, 3, H, W)`` or one image ``(3, H, W)``."""
        images = images.unsqueeze(0) if images.ndim == 3 else images
        return self.search_inputs(model, "image", images, k)

    # ------------------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index to directory ``path`` atomically; an existing index is replaced only with ``overwrite``."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "num_items": len(self),
            "embed_dim": self.dim,
            "model": self.model_info,
            "backend": {"name": self.backend, "faiss_kind": self.faiss_kind, "faiss_params": self.faiss_params},
            "ids": self.ids,
            "metadata": self.metadata,
        }
        text = json.dumps(header, indent=1, allow_nan=False)
        _check_destination(path, overwrite)
        with atomic_directory(path, overwrite=True) as tmp:
            save_file({"embeddings": self.embeddings.cpu().contiguous()}, str(tmp / EMBEDDINGS_FILE))
            if self.backend == "faiss":
                self.build_faiss().save(tmp / FAISS_FILE)
                header["backend"]["faiss_params"] = self.faiss_params
                text = json.dumps(header, indent=1, allow_nan=False)
            (tmp / INDEX_FILE).write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, chunk_size: int = 8192) -> EmbeddingIndex:
        """Read an index written by ``save``, checking that its files agree with each other."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        header = _read_header(path)
        try:
            tensors = load_file(str(path / EMBEDDINGS_FILE))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path / EMBEDDINGS_FILE} is not a readable safetensors file: {err}") from err
        emb = tensors.get("embeddings")
        expected = (header["num_items"], header["embed_dim"])
        if emb is None or tuple(emb.shape) != expected or emb.dtype != torch.float32:
            got = f"{emb.dtype} {tuple(emb.shape)}" if emb is not None else f"tensors {sorted(tensors)}"
            raise ValueError(f"{path / EMBEDDINGS_FILE} should hold float32 'embeddings' {expected}, got {got}")
        backend = header["backend"]
        index = cls(
            emb,
            header["ids"],
            header["model"],
            header["metadata"],
            backend=backend.get("name", "exact"),
            faiss_kind=backend.get("faiss_kind", "ivf"),
            faiss_params=backend.get("faiss_params"),
            chunk_size=chunk_size,
            normalize=False,
        )
        if index.backend == "faiss" and (path / FAISS_FILE).is_file():
            index._faiss = FaissSearcher.load(
                path / FAISS_FILE, index.faiss_kind, index.faiss_params, index.dim, len(index)
            )
        return index


def _read_header(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"index {path} {what}; expected a directory written by EmbeddingIndex.save")
    file = path / INDEX_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {INDEX_FILE}; it is not an index written by EmbeddingIndex.save")
    try:
        header = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise ValueError(f"{file} is not a polymodal index (its 'format' is not {INDEX_FORMAT!r})")
    if header.get("version") != INDEX_VERSION:
        raise ValueError(f"{file} has index version {header.get('version')!r}; this polymodal reads {INDEX_VERSION}")
    required = ("num_items", "embed_dim", "model", "backend", "ids", "metadata")
    missing = [key for key in required if key not in header]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}")
    n = header["num_items"]
    if len(header["ids"]) != n or len(header["metadata"]) != n:
        raise ValueError(f"{file} lists {len(header['ids'])} ids and {len(header['metadata'])} metadata for {n} items")
    return header


def _check_destination(path: Path, overwrite: bool) -> None:
    """An existing ``path`` may be replaced only with ``overwrite``, and only if it is an index (holds
    ``index.json``), so a mistyped output path never deletes unrelated files."""
    if path.exists():
        if not overwrite:
            raise OutputExistsError(path)
        if not (path.is_dir() and (path / INDEX_FILE).is_file()):
            raise FileExistsError(f"{path} exists and is not an index (no {INDEX_FILE}); refusing to replace it")
