"""Tokenizing costs time bounded by the context length, whatever the text, and gives the same ids.

A 100,000-character word used to take minutes (BPE merging grows faster than linearly with word
length) and a tokenizer read every character of a text before truncating it.
"""

from __future__ import annotations

import functools
import random
import string
import time

import pytest
import torch

from polymodal.encoders.tokenizer import (
    _END_OF_WORD,
    CLIPTokenizer,
    HFTokenizer,
    clean_text,
    content_prefix_end,
    shorten_whitespace_runs,
)

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LETTERS = string.ascii_lowercase + "éü猫😀"


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def random_word(rng: random.Random, n: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def naive_merge(tokenizer: CLIPTokenizer, word: str) -> tuple[int, ...]:
    """CLIP's BPE as written in the original: rescan every pair each round."""
    ranks = tokenizer.merge_ranks
    symbols = [*word[:-1], word[-1] + _END_OF_WORD]
    while len(symbols) > 1:
        rank, first, second = min((ranks.get(p, len(ranks)), *p) for p in zip(symbols, symbols[1:]))
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return tuple(tokenizer.encoder[s] for s in symbols)


def test_heap_merging_equals_the_round_by_round_reference(tokenizer):
    rng = random.Random(0)
    symbols = "".join(tokenizer._byte_to_symbol)
    words = ["a", "aa", "aaa", "aaaaaaa", "ababababa", "photograph", "llllllllll", "thethethe"]
    words += [random_word(rng, rng.randint(1, 60), "etaoinshrdlu") for _ in range(300)]
    words += [random_word(rng, rng.randint(1, 40), symbols) for _ in range(300)]  # every byte symbol
    for word in words:
        assert tokenizer._merge_word(word) == naive_merge(tokenizer, word), word


def padded(ids: list[int], length: int, sot: int = 49406, eot: int = 49407) -> list[int]:
    row = [sot, *ids, eot]
    if len(row) > length:
        row = row[: length - 1] + [eot]
    return row + [0] * (length - len(row))


@pytest.mark.parametrize("length", [3, 16, 77])
def test_a_long_word_is_cut_to_the_prefix_of_the_whole_words_ids(tokenizer, reference, length):
    rng = random.Random(length)
    for n in (100, 1_000, 6_000, 12_000):  # beyond the merge window, where the slow path still runs
        word = random_word(rng, n)
        full = reference.encode(word)  # open_clip merges the whole word
        assert len(full) > length or n == 100
        assert tokenizer(word, context_length=length)[0].tolist() == padded(full, length), n
        text = f"a photo of {word} on a sofa"
        assert tokenizer(text, context_length=length)[0].tolist() == padded(reference.encode(text), length), n


def test_long_texts_are_cut_to_the_prefix_of_the_whole_texts_ids(tokenizer, reference):
    rng = random.Random(1)
    texts = [
        " ".join(random_word(rng, rng.randint(1, 12)) for _ in range(3_000)),  # many words
        "a cat " + " \t\n" * 10_000 + "on a sofa",  # a long whitespace run that cleaning collapses
        "\x00" * 30_000 + " a dog",  # control characters that cleaning removes: read further
        "&amp;" * 1_500 + " a dog",  # HTML entities that cleaning shortens
        "don't " * 3_000 + "we're",
    ]
    for text in texts:
        for length in (5, 77):
            got = tokenizer(text, context_length=length)[0].tolist()
            assert got == padded(reference.encode(text), length), (text[:20], length)
            assert tokenizer.encode(text, max_tokens=length) == reference.encode(text)[:length]


def test_texts_that_fit_are_tokenized_exactly_as_without_a_bound(tokenizer):
    rng = random.Random(2)
    captions = ["a photo of a dog", "Two CATS on the red sofa!", "猫 😀 &amp; don't", "", "   "]
    captions += [" ".join(random_word(rng, rng.randint(1, 9)) for _ in range(rng.randint(1, 20))) for _ in range(200)]
    for caption in captions:
        ids = tokenizer.encode(caption)  # no bound: every character is read
        if len(ids) <= 75:
            assert tokenizer(caption)[0].tolist() == padded(ids, 77), caption
            assert tokenizer.encode(caption, max_tokens=76) == ids


def test_shortened_whitespace_runs_clean_to_the_same_text():
    rng = random.Random(6)
    pieces = ["cafÃ©", "donâ€™t", "&amp;lt;b&amp;gt;", "<b>", "猫", "Straße", "a", "\x00", "\u00a0", "Ã\u00a0"]
    spaces = [" ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2028"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) + rng.choice(spaces) * rng.choice([1, 2, 17, 40]) for _ in range(12))
        assert clean_text(shorten_whitespace_runs(text), "lower") == clean_text(text, "lower"), repr(text)
    assert shorten_whitespace_runs("a" + " " * 30 + "b") == "a" + " " * 16 + "b"
    assert shorten_whitespace_runs("a" + " " * 10 + "\n" + " " * 10 + "b") == "a" + " " * 8 + "\n" + " " * 8 + "b"


def test_content_prefix_end_counts_only_non_whitespace():
    assert content_prefix_end("abc", 5) is None
    assert content_prefix_end("ab   cd  ef", 3) == 6  # "ab   c"
    assert content_prefix_end(" " * 100 + "x", 2) is None
    assert content_prefix_end("x" * 100, 10) == 10


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@functools.lru_cache(maxsize=1)
def pathological_texts() -> tuple[str, ...]:
    rng = random.Random(3)
    return (
        random_word(rng, 100_000),  # one word
        "".join(rng.choice(string.ascii_letters + "  éü猫😀.,&") for _ in range(1_000_000)),  # a long text
        " ".join(random_word(rng, 3) for _ in range(250_000)),  # a million characters of short words
        "a\n" * 500_000,  # a million characters of short lines (cleaning costs time per line)
        "a cat" + " \r\n\t" * 250_000 + "on a sofa",  # a million characters of whitespace
    )


def test_pathological_captions_tokenize_in_well_under_a_second(tokenizer):
    tokenizer("warm up")
    for text in pathological_texts():
        seconds = _seconds(lambda text=text: tokenizer([text, text]))
        assert seconds < 1.0, (len(text), seconds)
        assert tokenizer.eot_token_id in tokenizer(text)[0].tolist()
    assert tokenizer.batch_decode(tokenizer(pathological_texts()[-1:])) == ["a cat on a sofa"]


# ---------------------------------------------------------------- Hugging Face wrapper


@pytest.fixture(scope="module")
def byte_bpe_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer (GPT-2 style), trained here and saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(4)
    corpus = [" ".join(random_word(rng, rng.randint(1, 8), "etaoinshrdlu") for _ in range(30)) for _ in range(300)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    saved = tmp_path_factory.mktemp("byte_bpe")
    fast.save_pretrained(str(saved))
    return saved, fast


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "dog", "on", "the", "sofa", "##s", "##t", "t"]
    folder = tmp_path_factory.mktemp("wordpiece_vocab")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    reference = transformers.BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    saved = tmp_path_factory.mktemp("wordpiece")
    reference.save_pretrained(str(saved))
    return saved, reference


@pytest.mark.parametrize("kind", ["byte_bpe_dir", "wordpiece_dir"])
@pytest.mark.parametrize("clean", [None, "whitespace"])
def test_hf_long_texts_give_the_prefix_of_the_whole_texts_ids(kind, clean, request):
    path, reference = request.getfixturevalue(kind)
    rng = random.Random(5)
    texts = [
        random_word(rng, 3_000, "etaoinshrdlu"),
        "a cat on the sofa " + random_word(rng, 5_000, "tsa"),
        " ".join(random_word(rng, 4, "etaoinshrdlu") for _ in range(3_000)),
        "the cat " + " " * 60_000 + "on the sofa",
        "a dog",
    ]
    for length in (4, 16):
        tokenizer = HFTokenizer(path, context_length=length, clean=clean)
        expected = reference(
            [clean_text(t, clean) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="pt",
        )["input_ids"]
        assert torch.equal(tokenizer(texts), expected)


@pytest.mark.parametrize("kind", ["byte_bpe_dir", "wordpiece_dir"])
def test_hf_pathological_captions_tokenize_in_well_under_a_second(kind, request):
    path, _ = request.getfixturevalue(kind)
    tokenizer = HFTokenizer(path, context_length=77)
    tokenizer("warm up")
    for text in pathological_texts():
        seconds = _seconds(lambda text=text: tokenizer([text, text]))
        assert seconds < 1.0, (len(text), seconds)
