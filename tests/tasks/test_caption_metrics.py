"""BLEU and CIDEr-D against values worked out by hand (the counts are spelled out in the comments)."""

from __future__ import annotations

import math

import pytest

from polymodal.tasks.captioning import caption_words, cider_d, corpus_bleu, ngram_counts


def test_caption_words_and_ngrams():
    assert caption_words("A red circle, in the top-left!") == ["a", "red", "circle", "in", "the", "top", "left"]
    assert caption_words("It's 2 shapes.") == ["it's", "2", "shapes"]
    assert ngram_counts(["a", "b", "a", "b"], 2) == {("a", "b"): 2, ("b", "a"): 1}
    assert ngram_counts(["a"], 2) == {}
    with pytest.raises(TypeError, match="must be a str"):
        caption_words(["a"])


def test_bleu_one_sentence_two_references():
    # candidate: a red circle on the left (6 words)
    # references: "a red circle in the top left" (7) and "a red circle" (3): the closest length is 7
    # 1-grams: a red circle the left match, "on" does not: 5/6
    # 2-grams: (a red) (red circle) match; (circle on) (on the) (the left) do not: 2/5
    # 3-grams: (a red circle) matches; (red circle on) (circle on the) (on the left) do not: 1/4
    # 4-grams: none of the 3 match
    cand = ["a red circle on the left"]
    refs = [["a red circle in the top left", "a red circle"]]
    bp = math.exp(1 - 7 / 6)
    out = corpus_bleu(cand, refs, max_n=4)
    assert out.precisions == pytest.approx([5 / 6, 2 / 5, 1 / 4, 0.0])
    assert out.brevity_penalty == pytest.approx(bp)
    assert (out.candidate_length, out.reference_length) == (6, 7)
    assert out.score == 0.0  # no smoothing: no matching 4-gram anywhere
    assert corpus_bleu(cand, refs, max_n=3).score == pytest.approx(bp * (5 / 6 * 2 / 5 * 1 / 4) ** (1 / 3))
    assert corpus_bleu(cand, refs, max_n=2).score == pytest.approx(bp * (5 / 6 * 2 / 5) ** (1 / 2))


def test_bleu_pools_counts_over_the_corpus():
    # A: "the cat sat on the mat" against "the cat is on the mat" / "there is a cat on the mat"
    #   1-grams: the x2 (a reference has two), cat, on, mat match, sat does not: 5/6
    #   2-grams: (the cat) (on the) (the mat) match of 5: 3/5;  3-grams: (on the mat) of 4: 1/4;  4-grams: 0/3
    #   closest reference length 6
    # B: equal to its only reference, 7 words: 7/7, 6/6, 5/5, 4/4
    cands = ["the cat sat on the mat", "A red circle in the top left."]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["a red circle in the top left"]]
    out = corpus_bleu(cands, refs)
    assert out.precisions == pytest.approx([12 / 13, 9 / 11, 6 / 9, 4 / 7])
    assert out.brevity_penalty == 1.0
    assert out.score == pytest.approx((12 / 13 * 9 / 11 * 6 / 9 * 4 / 7) ** 0.25)
    # sentence A alone has no matching 4-gram, so averaging sentence scores would give about half this
    assert corpus_bleu(cands[:1], refs[:1]).score == 0.0


def test_bleu_clipping_brevity_and_ties():
    # Papineni et al.'s example: "the" 7 times, at most twice in a reference
    assert corpus_bleu(["the the the the the the the"], [["the cat is on the mat"]], max_n=1).score == pytest.approx(
        2 / 7
    )
    # 3 words against 8: brevity penalty exp(1 - 8/3); 2-grams: (red circle) matches, (a red) does not
    out = corpus_bleu(["a red circle"], [["a small red circle in the top left"]], max_n=2)
    assert out.brevity_penalty == pytest.approx(math.exp(1 - 8 / 3))
    assert out.score == pytest.approx(math.exp(1 - 8 / 3) * math.sqrt(1 * 1 / 2))
    # a 5-word candidate with references of 4 and 6 words: the tie goes to the shorter, so no penalty
    out = corpus_bleu(["a b c d e"], [["a b c d e f", "a b c d"]], max_n=1)
    assert out.reference_length == 4 and out.brevity_penalty == 1.0
    # identical captions score 1; an empty candidate scores 0
    assert corpus_bleu(["a red circle in the top left"], [["a red circle in the top left"]]).score == 1.0
    assert corpus_bleu([""], [["a red circle"]]).score == 0.0


def test_bleu_rejects_bad_input():
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        corpus_bleu(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        corpus_bleu(["a"], ["a"])  # a bare string is not a list of references
    with pytest.raises(ValueError, match="no captions"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu(["a"], [["a"]], max_n=0)


def test_cider_d_by_hand():
    # Two images. Document frequencies over the references: "a" is in both images' references, so its
    # weight log(2 / 2) is 0; every other 1-gram and every 2-gram is in one image's: weight L = log 2.
    # Image 1: candidate "a red red circle" (4 words); references "a red circle" (3), "a red round circle" (4).
    #   1-grams: candidate red 2L, circle L (norm L sqrt 5)
    #     vs "a red circle": red L, circle L (norm L sqrt 2); clipped dot min(2L, L) L + L L = 2 L^2
    #       -> 2 / sqrt(10), times the length penalty exp(-(4 - 3)^2 / (2 * 6^2)) = exp(-1/72)
    #     vs "a red round circle": red, round, circle L each (norm L sqrt 3); dot 2 L^2 -> 2 / sqrt(15)
    #   2-grams: candidate (a red) (red red) (red circle), L each (norm L sqrt 3)
    #     vs (a red) (red circle): norm L sqrt 2, dot 2 L^2 -> 2 / sqrt(6), times exp(-1/72)
    #     vs (a red) (red round) (round circle): norm L sqrt 3, dot L^2 -> 1 / 3
    # Image 2: the candidate equals its one reference -> similarity 1 for every order it has n-grams of.
    cands = ["a red red circle", "a blue square"]
    refs = [["a red circle", "a red round circle"], ["a blue square"]]
    penalty = math.exp(-1 / 72)
    unigram = (2 / math.sqrt(10) * penalty + 2 / math.sqrt(15)) / 2
    bigram = (2 / math.sqrt(6) * penalty + 1 / 3) / 2

    one = cider_d(cands, refs, max_n=1)
    assert one.per_caption == pytest.approx([10 * unigram, 10.0])
    assert one.score == pytest.approx((10 * unigram + 10) / 2)

    two = cider_d(cands, refs, max_n=2)
    assert two.per_caption == pytest.approx([10 * (unigram + bigram) / 2, 10.0])

    # default: 1- to 4-grams; image 2 has one 3-gram and no 4-gram (a zero vector scores 0)
    four = cider_d(cands, refs)
    assert four.per_caption[1] == pytest.approx(10 * 3 / 4)


def test_cider_d_weights_and_sigma():
    # An n-gram in every image's references carries no weight: "circle" here, so a candidate that gets
    # only the shape right scores 0, and one that gets only the colour right is rewarded.
    refs = [["red circle"], ["blue circle"]]
    assert cider_d(["blue circle", "red circle"], refs, max_n=1).per_caption == [0.0, 0.0]
    assert cider_d(["red circle", "blue circle"], refs, max_n=1).per_caption == pytest.approx([10.0, 10.0])
    # the Gaussian length penalty: one extra word, sigma 1 -> exp(-1/2) (weights: red L; the rest 0 or absent)
    out = cider_d(["red red", "blue circle"], [["red"], ["blue circle"]], max_n=1, sigma=1.0)
    # candidate "red red": red 2L vs reference red L: clipped dot L * L over (2L * L) = 1/2, times exp(-1/2)
    assert out.per_caption[0] == pytest.approx(10 * 0.5 * math.exp(-0.5))
