"""CLIPTokenizer against open_clip's tokenizer, id for id; HFTokenizer against transformers."""

from __future__ import annotations

import pickle
import random
import shutil

import pytest
import torch

from polymodal.encoders.tokenizer import (
    CLIPTokenizer,
    HFTokenizer,
    Tokenizer,
    clean_text,
    default_clip_vocab_path,
)

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

PARITY_STRINGS = [
    "a photo of a dog",
    "A Photo Of A DOG.",
    "Hello, World! How are you?",
    "",
    "   ",
    "\n\t \r\n",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines",
    "  leading and trailing whitespace  ",
    # contractions, including upper case and a curly apostrophe
    "don't",
    "I'LL be there, we're fine, they've gone, she'd say, I'm here, it's ok",
    "Don\u2019t stop",
    "rock 'n' roll",
    # numbers and punctuation
    "3.14159 and 2,000,000 people in 2023",
    "x-ray, e-mail; #hashtag @user $100 50% (parens) [brackets] {braces}",
    "!!!???...---***",
    "a/b\\c|d~e`f^g",
    "<start_of_text> and <end_of_text> written out",
    "</w>",
    # HTML entities, escaped once and twice
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;lt;i&amp;gt;doubly escaped&amp;lt;/i&amp;gt;",
    "&quot;quoted&quot; &#39;single&#39; &nbsp;space &copy; 2020",
    # mojibake that ftfy repairs
    "cafÃ©",
    "donâ€™t",
    "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
    # accents, ligatures, full-width forms, combining marks
    "Café naïve résumé Ångström Øre façade",
    "ﬁne ﬂower",
    "ＦＵＬＬ　ＷＩＤＴＨ",
    "e\u0301 combining accent",
    "Straße",
    "İstanbul",
    # other scripts and emoji
    "猫が好きです。一只猫坐在垫子上",
    "고양이 사진",
    "Кошка сидит на ковре",
    "Ελληνικά γράμματα",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "emoji 😀🐶🚀 👍🏽 👨‍👩‍👧",
    "flags 🇫🇷🇯🇵",
    # control characters, zero-width characters, odd whitespace
    "zero\u200bwidth",
    "bom\ufefftext",
    "bell\x07 and null\x00 chars",
    "line\u2028separator",
    "nbsp\u00a0here",
]


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Strings mixing ASCII, Latin-1, CJK, emoji, RTL, combining marks and caption fragments."""
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(128)],
        [chr(c) for c in range(128, 0x250)],
        [chr(c) for c in range(0x4E00, 0x4E00 + 300)],
        [chr(c) for c in range(0x1F300, 0x1F650)],
        [chr(c) for c in range(0x590, 0x700)],
        [chr(c) for c in range(0x300, 0x370)],
        ["&amp;", "&lt;", "&gt;", "&#39;", "&amp;amp;", "'s", "'LL", "\u2019", "\r\n", "Ã©", "â€™", "\u200b"],
        ["the", "a", "photo", "of", "dog", "cat", "don't", "I'LL", "2023", "3.14", "x-ray"],
    ]
    out = []
    for _ in range(n):
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 30))]
        out.append("".join(p + (" " if rng.random() < 0.3 else "") for p in parts))
    return out


def test_special_tokens_and_vocab_size(tokenizer, reference):
    assert tokenizer.vocab_size == reference.vocab_size == 49408
    assert tokenizer.sot_token_id == reference.sot_token_id == 49406
    assert tokenizer.eot_token_id == reference.eot_token_id == 49407
    assert tokenizer.pad_token_id == 0
    assert tokenizer.context_length == 77


@pytest.mark.parametrize("text", PARITY_STRINGS)
def test_ids_match_open_clip(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode(text)
    assert torch.equal(tokenizer(text), reference(text))


def test_random_strings_match_open_clip(tokenizer, reference):
    texts = random_strings(300)
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text), repr(text)
    assert torch.equal(tokenizer(texts), reference(texts))


def test_call_returns_long_tensor_with_sot_eot_and_zero_padding(tokenizer):
    out = tokenizer("a photo of a dog")
    assert out.dtype == torch.long and out.shape == (1, 77)
    ids = tokenizer.encode("a photo of a dog")
    assert out[0, 0] == tokenizer.sot_token_id
    assert out[0, 1 : 1 + len(ids)].tolist() == ids
    assert out[0, 1 + len(ids)] == tokenizer.eot_token_id
    assert (out[0, 2 + len(ids) :] == 0).all()


@pytest.mark.parametrize("context_length", [77, 16, 5, 2, 1])
def test_long_text_is_truncated_with_eot_last(tokenizer, reference, context_length):
    text = " ".join(f"word{i} café 猫" for i in range(100))
    assert len(tokenizer.encode(text)) > 77
    out = tokenizer(text, context_length=context_length)
    assert out.shape == (1, context_length)
    assert out[0, -1] == tokenizer.eot_token_id
    if context_length > 1:
        assert out[0, 0] == tokenizer.sot_token_id
        assert out[0, 1:-1].tolist() == tokenizer.encode(text)[: context_length - 2]
    assert torch.equal(out, reference(text, context_length=context_length))


def test_text_that_exactly_fills_the_context(tokenizer, reference):
    # Each repeated "dog" is one token: 5 words + sot + eot fill a context of 7 with no padding.
    text = "dog " * 5
    assert len(tokenizer.encode(text)) == 5
    exact = tokenizer(text, context_length=7)
    assert exact[0].tolist() == [tokenizer.sot_token_id] + tokenizer.encode(text) + [tokenizer.eot_token_id]
    one_short = tokenizer(text, context_length=6)
    assert one_short[0, -1] == tokenizer.eot_token_id and one_short[0, -2] != tokenizer.eot_token_id
    assert torch.equal(one_short, reference(text, context_length=6))


def test_batch_with_mixed_lengths(tokenizer, reference):
    texts = ["", "a dog", "a photo of " * 40, "猫 😀", "&amp; don't", "   "]
    out = tokenizer(texts)
    assert out.shape == (len(texts), 77)
    assert torch.equal(out, reference(texts))
    for row, text in zip(out, texts):
        eot_at = row.tolist().index(tokenizer.eot_token_id)
        assert eot_at == min(len(tokenizer.encode(text)) + 1, 76)
        assert (row[eot_at + 1 :] == 0).all()
    assert torch.equal(tokenizer(tuple(texts)), out)


def test_custom_context_length(reference):
    tokenizer = CLIPTokenizer(context_length=32)
    texts = ["a photo of a cat", "a diagram " * 20]
    out = tokenizer(texts)
    assert out.shape == (2, 32)
    assert torch.equal(out, reference(texts, context_length=32))
    # the call argument overrides the default
    assert tokenizer(texts, context_length=10).shape == (2, 10)
    assert torch.equal(tokenizer(texts, context_length=10), reference(texts, context_length=10))


def test_empty_batch(tokenizer):
    assert tokenizer([]).shape == (0, 77)


@pytest.mark.parametrize("text", ["a photo of a dog", "two cats sleeping on a red sofa", "the quick brown fox"])
def test_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # sot, eot and padding are stripped from a full row, as a tensor or a list
    row = tokenizer(text)[0]
    assert tokenizer.decode(row) == text
    assert tokenizer.decode(row.tolist()) == text


def test_decode_multibyte_characters_and_batches(tokenizer):
    text = "café 猫 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    rows = tokenizer(["a dog", text], context_length=12)
    assert tokenizer.batch_decode(rows) == ["a dog", text]


def test_decode_rejects_bad_ids(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([5, 49408])
    with pytest.raises(ValueError, match="batch_decode"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer ids"):
        tokenizer.decode([1.5])


@pytest.mark.parametrize("bad", [None, 3, 2.5, b"bytes", ["ok", None], ("ok", 7)])
def test_non_string_input_raises_type_error(tokenizer, bad):
    with pytest.raises(TypeError, match="expects a str or a list of str"):
        tokenizer(bad)


@pytest.mark.parametrize("bad", [None, 12, b"bytes"])
def test_encode_non_string_raises_type_error(tokenizer, bad):
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode(bad)


@pytest.mark.parametrize("context_length", [0, -3, 2.0, "77"])
def test_bad_context_length_raises(tokenizer, context_length):
    with pytest.raises(ValueError, match="positive integer context_length"):
        tokenizer("a dog", context_length=context_length)
    with pytest.raises(ValueError, match="positive integer context_length"):
        CLIPTokenizer(context_length=context_length)


def test_bpe_cache_is_bounded_and_does_not_change_ids(reference):
    tokenizer = CLIPTokenizer(cache_size=3)
    texts = random_strings(40, seed=1)
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text)
        assert len(tokenizer._cache) <= 3
    uncached = CLIPTokenizer(cache_size=0)
    assert [uncached.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    assert len(uncached._cache) == 0


def test_vocab_path_override(tmp_path, reference):
    copy = tmp_path / "merges.txt.gz"
    shutil.copy(default_clip_vocab_path(), copy)
    tokenizer = CLIPTokenizer(vocab_path=copy)
    assert torch.equal(tokenizer(PARITY_STRINGS), reference(PARITY_STRINGS))


def test_missing_or_invalid_vocab_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer(vocab_path=tmp_path / "missing.txt.gz")
    import gzip

    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version\na b\nc d\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        CLIPTokenizer(vocab_path=bad)


def test_pickle_round_trip(tokenizer):
    texts = ["a photo of a dog", "猫 😀", "don't"]
    tokenizer(texts)  # fill the cache first
    data = pickle.dumps(tokenizer)
    assert len(data) < 10_000  # settings only; the vocabulary is reloaded on the other side
    restored = pickle.loads(data)
    assert restored.context_length == tokenizer.context_length
    assert torch.equal(restored(texts), tokenizer(texts))


def test_clean_text_matches_open_clip_cleaning():
    from open_clip.tokenizer import get_clean_fn

    for mode in ("lower", "whitespace", "canonicalize"):
        reference_clean = get_clean_fn(mode)
        for text in PARITY_STRINGS:
            assert clean_text(text, mode) == reference_clean(text), (mode, text)
    assert clean_text("cafÃ© donâ€™t", "lower") == "café don't"
    assert clean_text("&amp;lt;B&amp;gt;  x", "whitespace") == "<B> x"
    assert clean_text("Hello_World, ok!", "canonicalize") == "hello world ok"
    assert clean_text("  Keep\tAS is ", None) == "  Keep\tAS is "
    with pytest.raises(ValueError, match="unknown clean mode"):
        clean_text("x", "upper")


# ---------------------------------------------------------------- Hugging Face wrapper

BERT_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "an", "the", "photo", "of", "dog", "cat", "cats", "on", "sofa", "red", "two", "sleeping",
    "play", "##ing", "##s", "##ed", "caf", "##e", "big", "small", "!", ",", ".", "?", "'", "-", "&",
]  # fmt: skip

HF_STRINGS = [
    "a photo of a dog",
    "Two CATS sleeping on the red sofa!",
    "dogs playing, cats played.",
    "Café  \t  on the   sofa?",
    "an unknown wordpiece zebra",
    "",
    "the dog " * 30,
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny WordPiece tokenizer saved with save_pretrained."""
    vocab_dir = tmp_path_factory.mktemp("vocab")
    (vocab_dir / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    # from_pretrained on a directory with vocab.txt reads it in transformers 4 and 5 alike
    # (transformers 5 silently ignores the vocab_file= constructor argument).
    reference = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir), local_files_only=True)
    assert len(reference) == len(BERT_VOCAB)
    saved = tmp_path_factory.mktemp("bert_tokenizer")
    reference.save_pretrained(str(saved))
    return saved, reference


@pytest.mark.parametrize("clean", [None, "whitespace"])
def test_hf_tokenizer_matches_transformers(bert_dir, clean):
    path, reference = bert_dir
    tokenizer = HFTokenizer(path, context_length=12, clean=clean)
    out = tokenizer(HF_STRINGS)
    expected = reference(HF_STRINGS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    assert out.dtype == torch.long and out.shape == (len(HF_STRINGS), 12)
    assert torch.equal(out, expected["input_ids"])
    # the long text is truncated and keeps its closing [SEP]
    assert out[-1, -1] == reference.sep_token_id
    assert out[0].tolist()[:7] == [2, 5, 8, 9, 5, 10, 3]


def test_hf_tokenizer_attributes_and_context_length(bert_dir):
    path, reference = bert_dir
    tokenizer = HFTokenizer(str(path))
    assert tokenizer.pad_token_id == reference.pad_token_id == 0
    assert tokenizer.vocab_size == len(BERT_VOCAB)
    assert tokenizer.sot_token_id == reference.cls_token_id
    assert tokenizer.eot_token_id == reference.sep_token_id
    assert tokenizer.context_length == 77
    assert tokenizer("a dog").shape == (1, 77)
    expected = reference(["a dog"], padding="max_length", truncation=True, max_length=5, return_tensors="pt")
    assert torch.equal(tokenizer("a dog", context_length=5), expected["input_ids"])
    assert tokenizer([]).shape == (0, 77)


def test_hf_tokenizer_encode_and_decode(bert_dir):
    path, reference = bert_dir
    tokenizer = HFTokenizer(path)
    assert (
        tokenizer.encode("two cats sleeping") == reference("two cats sleeping", add_special_tokens=False)["input_ids"]
    )
    row = tokenizer("two cats sleeping on the sofa")[0]
    assert tokenizer.decode(row) == "two cats sleeping on the sofa"
    assert tokenizer.batch_decode(tokenizer(["a dog", "a cat"])) == ["a dog", "a cat"]


def test_hf_tokenizer_missing_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="never downloads") as info:
        HFTokenizer(missing)
    assert str(missing) in str(info.value)


def test_hf_tokenizer_directory_without_tokenizer(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        HFTokenizer(tmp_path)


def test_hf_tokenizer_rejects_non_strings_and_bad_clean(bert_dir):
    path, _ = bert_dir
    tokenizer = HFTokenizer(path)
    with pytest.raises(TypeError, match="expects a str or a list of str"):
        tokenizer(None)
    with pytest.raises(TypeError, match="got int at index 1"):
        tokenizer(["ok", 3])
    with pytest.raises(ValueError, match="unknown clean mode"):
        HFTokenizer(path, clean="upper")


def test_both_satisfy_the_tokenizer_protocol(tokenizer, bert_dir):
    assert isinstance(tokenizer, Tokenizer)
    assert isinstance(HFTokenizer(bert_dir[0]), Tokenizer)
    assert not isinstance(object(), Tokenizer)
