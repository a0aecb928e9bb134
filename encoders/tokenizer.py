"""Text tokenizers: CLIP's byte-level BPE and a wrapper around local Hugging Face tokenizers.

Both turn a string or a list of strings into a ``LongTensor (B, context_length)`` of token ids,
padded and truncated to a fixed length, which is what the text encoders consume.
"""

from __future__ import annotations

import gzip
import heapq
import html
import importlib.util
import operator
import os
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import ftfy
import regex
import torch

DEFAULT_CONTEXT_LENGTH = 77
CLIP_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLEAN_MODES = ("lower", "whitespace", "canonicalize", None)

# The released CLIP vocabulary: 256 byte symbols, the same 256 as word endings, the merges and the
# two special tokens, 49408 ids in all. The merges file holds more merges than CLIP used.
_NUM_BYTES = 256
_CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = _CLIP_VOCAB_SIZE - 2 * _NUM_BYTES - 2  # 48894
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
_END_OF_WORD = "</w>"

# Special tokens first so they survive as single pieces; then English contractions, runs of letters,
# single digits and runs of anything else that is not whitespace.
_PRETOKENIZE = regex.compile(
    rf"{_SOT}|{_EOT}|'(?:s|t|re|ve|m|ll|d)|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_NON_WHITESPACE = regex.compile(r"\S+")
_LONG_WHITESPACE = regex.compile(r"\s{17,}")
_LAST_WHITESPACE_RUN = regex.compile(r"(?r)\s+")
# Texts longer than this have their whitespace runs shortened before cleaning; no caption is.
_SHORTEN_ABOVE = 16_384


@runtime_checkable
class Tokenizer(Protocol):
    """What a text encoder needs from a tokenizer.

    ``__call__`` maps a string or list of strings to a ``LongTensor (B, context_length)`` padded with
    ``pad_token_id``; every id is below ``vocab_size``.
    """

    context_length: int
    vocab_size: int
    pad_token_id: int

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor: ...


def clean_text(text: str, mode: str | None = "lower") -> str:
    """Normalise raw text the way CLIP's tokenizer does before splitting it.

    Args:
        text: raw text.
        mode: ``"lower"`` (fix mojibake with ftfy, unescape HTML twice, collapse whitespace, lowercase),
            ``"whitespace"`` (the same without lowercasing), ``"canonicalize"`` (also drop ASCII
            punctuation and turn underscores into spaces) or ``None`` (leave the text as it is).
    """
    if mode is None:
        return text
    if mode not in CLEAN_MODES:
        raise ValueError(f"unknown clean mode {mode!r}; expected one of {CLEAN_MODES}")
    # Captions scraped from the web are often HTML-escaped twice (``&amp;lt;``).
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION_TABLE).lower()
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


def content_prefix_end(text: str, characters: int) -> int | None:
    """Where the prefix of ``text`` holding ``characters`` non-whitespace characters ends.

    Returns ``None`` when the whole text holds fewer: whitespace runs, however long, do not count,
    because cleaning collapses them.
    """
    if len(text) <= characters:
        return None
    count = 0
    for run in _NON_WHITESPACE.finditer(text):
        if count + len(run.group()) >= characters:
            return run.start() + characters - count
        count += len(run.group())
    return None


def shorten_whitespace_runs(text: str) -> str:
    """Shorten every whitespace run of over 16 characters to its first and last 8 (plus a newline
    when one was dropped), which ``clean_text`` collapses to the same single space.

    Cleaning costs time per line (ftfy), so a run of a million newlines would cost seconds; the
    ends of each run and a line break are kept because ftfy fixes text line by line.
    """
    return _LONG_WHITESPACE.sub(_shorten_run, text)


def _shorten_run(match: regex.Match) -> str:
    run = match.group()
    return run[:8] + ("\n" if "\n" in run[8:-8] else "") + run[-8:]


def _as_text_list(texts: object, owner: str) -> list[str]:
    """Accept one string or a sequence of strings; raise a ``TypeError`` naming the offender otherwise."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (list, tuple)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{owner} expects a str or a list of str, got {type(text).__name__} at index {i}")
        return list(texts)
    raise TypeError(f"{owner} expects a str or a list of str, got {type(texts).__name__}")


def _check_context_length(context_length: object, owner: str) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"{owner} expects a positive integer context_length, got {context_length!r}")
    return context_length


def _as_id_list(ids: object, owner: str) -> list[int]:
    """Turn a 1-D tensor / array or a sequence of ints into a list of Python ints."""
    if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # torch.Tensor or numpy.ndarray
        if ids.ndim != 1:
            raise ValueError(
                f"{owner}.decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}; "
                "use batch_decode for a batch"
            )
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{owner}.decode expects a list of ints or a 1-D tensor, got {type(ids).__name__}")
    try:
        return [operator.index(i) for i in ids]
    except TypeError:
        bad = next(i for i in ids if not hasattr(i, "__index__"))
        raise TypeError(f"{owner}.decode expects integer ids, got {type(bad).__name__}") from None


def _byte_symbols() -> list[str]:
    """One printable character per byte value, so BPE never handles whitespace or control characters.

    Bytes that are already visible Latin-1 characters stand for themselves; the rest are given code
    points from 256 upwards, in byte order.
    """
    visible = set(range(ord("!"), ord("~") + 1))
    visible |= set(range(ord("\xa1"), ord("\xac") + 1))
    visible |= set(range(ord("\xae"), ord("\xff") + 1))
    symbols = []
    next_free = _NUM_BYTES
    for byte in range(_NUM_BYTES):
        if byte in visible:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_free))
            next_free += 1
    return symbols


def default_clip_vocab_path() -> Path:
    """Locate CLIP's merges file inside the installed open_clip package without importing it."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / CLIP_VOCAB_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"could not find {CLIP_VOCAB_FILENAME} in an installed open_clip package; "
        "install open_clip_torch or pass vocab_path= to CLIPTokenizer"
    )


class _ClipVocab(NamedTuple):
    encoder: dict[str, int]  # BPE symbol -> id
    merge_ranks: dict[tuple[str, str], int]  # pair of symbols -> merge priority (lower merges first)
    id_bytes: dict[int, bytes]  # id -> the bytes it stands for, a word-final piece ending in a space


@lru_cache(maxsize=4)
def _load_clip_vocab(path: str) -> _ClipVocab:
    """Read a merges file into the tables the tokenizer needs; shared between instances."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The first line is a version header.
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    if len(merges) != _NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} is not a CLIP BPE merges file: expected {_NUM_MERGES} lines of 'a b' pairs")
    byte_symbols = _byte_symbols()
    # Byte symbols take the first ids in code-point order: the visible bytes, then the remapped ones.
    base = sorted(byte_symbols)
    symbols = base + [s + _END_OF_WORD for s in base] + [a + b for a, b in merges]
    encoder = {s: i for i, s in enumerate(symbols)}
    symbol_to_byte = {s: b for b, s in enumerate(byte_symbols)}
    id_bytes = {}
    for i, symbol in enumerate(symbols):
        word_end = symbol.endswith(_END_OF_WORD)
        core = symbol[: -len(_END_OF_WORD)] if word_end else symbol
        id_bytes[i] = bytes(symbol_to_byte[c] for c in core) + (b" " if word_end else b"")
    encoder[_SOT] = len(encoder)
    encoder[_EOT] = len(encoder)
    return _ClipVocab(encoder, {pair: rank for rank, pair in enumerate(merges)}, id_bytes)


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, id for id the same as open_clip's default tokenizer.

    Text is cleaned (ftfy, HTML unescaping, whitespace collapsing, lowercasing), split into words,
    each word's UTF-8 bytes are mapped to visible symbols and merged by the BPE ranks. Sequences are
    wrapped in start/end-of-text tokens, padded with 0 and truncated so the end-of-text token stays last.

    Args:
        context_length: default length of the rows ``__call__`` returns.
        vocab_path: a gzipped merges file; defaults to the one shipped with open_clip.
        cache_size: how many distinct words to keep the BPE result of.
    """

    pad_token_id = 0

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        vocab_path: str | os.PathLike | None = None,
        cache_size: int = 100_000,
    ) -> None:
        self.context_length = _check_context_length(context_length, "CLIPTokenizer")
        path = Path(vocab_path) if vocab_path is not None else default_clip_vocab_path()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP vocabulary file {str(path)!r} does not exist")
        self.vocab_path = path.resolve()
        vocab = _load_clip_vocab(str(self.vocab_path))
        self.encoder, self.merge_ranks, self._id_bytes = vocab
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[_SOT]
        self.eot_token_id = self.encoder[_EOT]
        self._byte_to_symbol = _byte_symbols()
        # The longest piece one id stands for (32 bytes in CLIP's vocabulary): what bounds how much
        # of a text can possibly fit in a context.
        self.max_symbol_bytes = max(len(piece) for piece in self._id_bytes.values())
        self._special_ids = {_SOT: (self.sot_token_id,), _EOT: (self.eot_token_id,)}
        self.cache_size = cache_size
        # A plain dict (rather than functools.lru_cache on a method) keeps the tokenizer picklable
        # for DataLoader workers; the oldest entries are evicted first.
        self._cache: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(context_length={self.context_length}, vocab_size={self.vocab_size})"

    def __getstate__(self) -> dict:
        # DataLoader workers receive a pickled copy: send the settings, not 100k-entry tables.
        return {
            "context_length": self.context_length,
            "vocab_path": self.vocab_path,
            "cache_size": self.cache_size,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _merge_word(self, word: str, word_end: bool = True) -> tuple[int, ...]:
        """Apply BPE merges to one byte-mapped word and return its ids.

        Each round merges every non-overlapping occurrence, left to right, of the lowest-ranked
        adjacent pair (CLIP's rule). Pairs wait in a heap keyed by (rank, position) over a linked
        list of symbols, so a word of n bytes costs O(n log n) rather than a rescan per round.

        Args:
            word: the word's bytes as symbols.
            word_end: mark the last symbol as word-final; off for a word cut short.
        """
        ranks, encoder = self.merge_ranks, self.encoder
        symbols: list[str | None] = list(word)
        if word_end:
            symbols[-1] += _END_OF_WORD
        n = len(symbols)
        after = [*range(1, n), -1]  # index of the next live symbol, -1 at the end
        before = list(range(-1, n - 1))
        heap = [(rank, i) for i in range(n - 1) if (rank := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            merged = []
            # Every occurrence of this round's pair, in position order (the heap's tie-break). A
            # merge never creates the same pair again (its result is longer than either part), so
            # the round is complete before any pair it creates is considered.
            while heap and heap[0][0] == rank:
                i = heapq.heappop(heap)[1]
                j = after[i]
                if symbols[i] is None or j == -1 or ranks.get((symbols[i], symbols[j])) != rank:
                    continue  # stale: a neighbour was merged since this pair was queued
                symbols[i] += symbols[j]
                symbols[j] = None
                after[i] = after[j]
                if after[i] != -1:
                    before[after[i]] = i
                merged.append(i)
            for i in merged:
                for left in (before[i], i):
                    right = after[left] if left != -1 else -1
                    if right != -1 and (pair_rank := ranks.get((symbols[left], symbols[right]))) is not None:
                        heapq.heappush(heap, (pair_rank, left))
        ids = []
        i = 0  # the first symbol only ever absorbs its right neighbours, so it stays live
        while i != -1:
            ids.append(encoder[symbols[i]])
            i = after[i]
        return tuple(ids)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = self._special_ids.get(word)
        if ids is not None:
            return ids
        ids = self._merge_word(word)
        if self.cache_size > 0:
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # dicts keep insertion order: oldest first
            self._cache[word] = ids
        return ids

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text`` without start/end-of-text tokens, padding or truncation.

        Args:
            text: raw text.
            max_tokens: return at most this many ids: the first ones the whole text gives. The cost
                is then bounded by ``max_tokens`` however long the text or its words are, because
                only a prefix of the text holding far more content than can fit is cleaned and split.
        """
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode expects a str, got {type(text).__name__}")
        if max_tokens is None:
            return self._encode_clean(clean_text(text, "lower"), None, complete=True)
        if max_tokens <= 0:
            return []
        budget = 8 * max_tokens + 64  # non-whitespace characters; grown while they give too few ids
        while True:
            end = content_prefix_end(text, budget)
            prefix = text if end is None else text[:end]
            if len(prefix) > _SHORTEN_ABOVE:
                prefix = shorten_whitespace_runs(prefix)
            ids = self._encode_clean(clean_text(prefix, "lower"), max_tokens, complete=end is None)
            if end is None or len(ids) >= max_tokens:
                return ids
            budget *= 4

    def _merge_window(self, max_tokens: int) -> int:
        # Twice the bytes that max_tokens ids can cover: a word is merged over at most this many
        # bytes, which leaves at least max_tokens ids between the last id kept and the cut.
        return 2 * max_tokens * self.max_symbol_bytes

    def _encode_clean(self, cleaned: str, max_tokens: int | None, complete: bool) -> list[int]:
        """Ids of cleaned text; ``complete=False`` for a prefix whose last pieces may be cut short."""
        to_symbol = self._byte_to_symbol
        window = None if max_tokens is None else self._merge_window(max_tokens)
        # A cut can split a word, a contraction or an HTML entity; pieces ending this close to it
        # are not trusted (the longest entity is 33 characters, escaped twice it is 37).
        trusted_end = len(cleaned) if complete else len(cleaned) - 64
        ids: list[int] = []
        for match in _PRETOKENIZE.finditer(cleaned):
            data = match.group().encode("utf-8")
            if window is not None and len(data) > window:
                # Merging is local, so the ids far before the end of the window are the whole word's.
                ids.extend(self._merge_word("".join([to_symbol[b] for b in data[:window]]), word_end=False))
            elif match.end() > trusted_end:
                break
            else:
                ids.extend(self._word_ids("".join([to_symbol[b] for b in data])))
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids[:max_tokens]
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize ``texts`` into a ``LongTensor (B, context_length)``.

        Args:
            texts: one string (``B = 1``) or a list of strings.
            context_length: row length; defaults to the one given at construction.
        """
        texts = _as_text_list(texts, "CLIPTokenizer")
        length = self.context_length if context_length is None else context_length
        length = _check_context_length(length, "CLIPTokenizer")
        rows = []
        for text in texts:
            # One id more than fits, so a text that overflows is still seen to overflow.
            ids = [self.sot_token_id, *self.encode(text, max_tokens=length - 1), self.eot_token_id]
            if len(ids) > length:
                ids = ids[: length - 1] + [self.eot_token_id]
            rows.append(ids + [self.pad_token_id] * (length - len(ids)))
        if not rows:
            return torch.zeros(0, length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a 1-D sequence of ids.

        Start-of-text tokens are dropped and decoding stops at the first end-of-text token, so the
        padding of a ``__call__`` row is ignored. Id 0 is also the real token ``"!"``, so zeros
        before an end-of-text token are decoded as such.
        """
        pieces = []
        for i in _as_id_list(ids, "CLIPTokenizer"):
            if i == self.eot_token_id:
                break
            if i == self.sot_token_id:
                continue
            if i not in self._id_bytes:
                raise ValueError(f"CLIPTokenizer.decode got id {i}, outside the vocabulary [0, {self.vocab_size})")
            pieces.append(self._id_bytes[i])
        # A multi-byte character may be split across ids, so decode UTF-8 only once all bytes are joined.
        return b"".join(pieces).decode("utf-8", errors="replace").strip()

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode each row of a ``(B, L)`` tensor or a list of id lists."""
        if isinstance(ids, torch.Tensor) and ids.ndim != 2:
            raise ValueError(f"CLIPTokenizer.batch_decode expects shape (B, L), got {tuple(ids.shape)}")
        return [self.decode(row) for row in ids]


class HFTokenizer:
    """A Hugging Face tokenizer loaded from local files, returning fixed-length id tensors.

    Nothing is ever downloaded: ``path`` must be a directory written by ``save_pretrained`` or a
    model id already in the local Hugging Face cache.

    Args:
        path: directory (or cached model id) holding the tokenizer files.
        context_length: default length of the rows ``__call__`` returns.
        clean: text cleaning applied before tokenizing, see ``clean_text``; the default keeps case
            because many Hugging Face vocabularies are cased.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str | None = "whitespace",
    ) -> None:
        from transformers import AutoTokenizer  # deferred: transformers is slow to import

        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {CLEAN_MODES}")
        self.context_length = _check_context_length(context_length, "HFTokenizer")
        self.clean = clean
        path = os.fspath(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"no tokenizer at {path!r}: the path does not exist and is not a model in the local "
                    "Hugging Face cache (HFTokenizer never downloads)"
                ) from e
            raise ValueError(
                f"{path!r} holds no tokenizer that transformers.AutoTokenizer can load "
                f"(expected files such as tokenizer.json or vocab.txt written by save_pretrained): {e}"
            ) from e
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer at {path!r} has no padding token; set one (e.g. tokenizer.pad_token = "
                "tokenizer.eos_token) and save it again"
            )
        self.path = path
        self.pad_token_id: int = self.tokenizer.pad_token_id
        # len() counts added tokens too, so an embedding table of this size covers every id.
        self.vocab_size: int = len(self.tokenizer)
        # The most characters one id stands for, which bounds how much of a text can fit in a context.
        self.max_token_chars: int = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.sot_token_id: int | None = _first_not_none(self.tokenizer.bos_token_id, self.tokenizer.cls_token_id)
        self.eot_token_id: int | None = _first_not_none(self.tokenizer.eos_token_id, self.tokenizer.sep_token_id)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.path!r}, context_length={self.context_length}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
        return self.tokenizer(clean_text(text, self.clean), add_special_tokens=False)["input_ids"]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize ``texts`` into a ``LongTensor (B, context_length)`` with the tokenizer's special tokens.

        Args:
            texts: one string (``B = 1``) or a list of strings.
            context_length: row length; defaults to the one given at construction.
        """
        texts = _as_text_list(texts, "HFTokenizer")
        length = self.context_length if context_length is None else context_length
        length = _check_context_length(length, "HFTokenizer")
        if not texts:
            return torch.full((0, length), self.pad_token_id, dtype=torch.long)
        texts = [self._clean_prefix(text, length) for text in texts]
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return out["input_ids"].long()

    def _clean_prefix(self, text: str, length: int) -> str:
        """The cleaned text, or of a prefix of it that gives the same first ``length`` ids.

        Tokenizers read the whole text before truncating, so a million-character caption would
        cost seconds; only a prefix that gives at least ``length`` ids is cleaned and tokenized.
        """
        budget = max(1024, 8 * length)  # characters; grown while they give too few ids
        while True:
            # Without cleaning, whitespace reaches the tokenizer as it is, so it counts.
            raw_end = budget if len(text) > budget else None
            end = raw_end if self.clean is None else content_prefix_end(text, budget)
            prefix = text if end is None else text[:end]
            # Drop the word the cut may have split: tokenizers split at whitespace first, so the
            # whole words before it give the text's own first ids. A single giant word is cut as
            # it is, and must then give twice the ids kept, to keep the cut far from them.
            last_space = _LAST_WHITESPACE_RUN.search(prefix) if end is not None else None
            whole_words = last_space is not None and last_space.start() > 0
            if whole_words:
                prefix = prefix[: last_space.start()]
            if self.clean is not None and len(prefix) > _SHORTEN_ABOVE:
                prefix = shorten_whitespace_runs(prefix)
            prefix = clean_text(prefix, self.clean)
            if end is None:
                return prefix
            if len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) >= length * (1 if whole_words else 2):
                return prefix
            budget *= 4  # e.g. a WordPiece vocabulary maps a long word to one [UNK]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a 1-D sequence of ids, special tokens and padding removed."""
        return self.tokenizer.decode(_as_id_list(ids, "HFTokenizer"), skip_special_tokens=True)

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode each row of a ``(B, L)`` tensor or a list of id lists."""
        if isinstance(ids, torch.Tensor) and ids.ndim != 2:
            raise ValueError(f"HFTokenizer.batch_decode expects shape (B, L), got {tuple(ids.shape)}")
        return [self.decode(row) for row in ids]


def _first_not_none(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)
