"""Caption metrics: corpus BLEU (Papineni et al., 2002) and CIDEr-D (Vedantam et al., 2015).

Both compare each candidate caption with one or more reference captions of the same image. Captions
are split into lower-case words with punctuation dropped (``caption_words``), so "A red circle." and
"a red circle" are the same caption.

BLEU-N is corpus-level: clipped n-gram matches and candidate n-grams are summed over the whole corpus
before dividing, the n = 1..N precisions are combined by a geometric mean with equal weights, and a
brevity penalty ``exp(1 - r / c)`` applies when the candidates' total length ``c`` is below ``r``, the
sum over candidates of the reference length closest to each (the shorter one on a tie). There is no
smoothing: a corpus without a single matching n-gram of some order scores 0.

CIDEr-D follows the coco-caption definition: each caption becomes, per n = 1..4, a vector of n-gram
counts weighted by ``log(I / df)`` (``I`` images, ``df`` the number of images whose references contain
the n-gram); a candidate's score against one reference is the cosine similarity with the candidate's
weights clipped at the reference's, times the length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))``
(lengths in words); it is averaged over the references and over n, and multiplied by 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_words(text: str) -> list[str]:
    """Lower-case words and numbers of ``text``, punctuation dropped (``"It's red."`` -> ``["it's", "red"]``)."""
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """How often each n-gram (a tuple of ``n`` words) occurs in ``words``."""
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]], name: str) -> None:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"{name} expects a list of candidate captions, got {type(candidates).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"{name} expects a list of reference lists, got {type(references).__name__}")
    if len(candidates) != len(references):
        raise ValueError(f"{name} got {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError(f"{name} got no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise ValueError(f"{name}: references[{i}] must be a non-empty list of captions, got {refs!r}")


@dataclass
class BleuScore:
    """Corpus BLEU and its parts.

    Attributes:
        score: BLEU in [0, 1].
        precisions: clipped n-gram precision for n = 1 .. max_n.
        brevity_penalty: ``min(1, exp(1 - r / c))``.
        candidate_length: ``c``, the total number of candidate words.
        reference_length: ``r``, the summed closest reference lengths.
    """

    score: float
    precisions: list[float]
    brevity_penalty: float
    candidate_length: int
    reference_length: int


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> BleuScore:
    """Corpus-level BLEU-``max_n`` of candidate captions against their references.

    Args:
        candidates: one caption per image.
        references: for each image, one or more reference captions.
        max_n: the longest n-gram; 4 gives BLEU-4.
    """
    _check_corpus(candidates, references, "corpus_bleu")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive integer, got {max_n!r}")
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for candidate, refs in zip(candidates, references):
        words = caption_words(candidate)
        ref_words = [caption_words(ref) for ref in refs]
        c += len(words)
        r += min((abs(len(ref) - len(words)), len(ref)) for ref in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = ngram_counts(words, n)
            most = Counter()  # the most times each n-gram occurs in any one reference
            for ref in ref_words:
                most |= ngram_counts(ref, n)
            matches[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            totals[n - 1] += sum(counts.values())
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    penalty = 0.0 if c == 0 else min(1.0, math.exp(1 - r / c))
    score = 0.0 if min(precisions) == 0 else penalty * math.exp(sum(map(math.log, precisions)) / max_n)
    return BleuScore(score, precisions, penalty, c, r)


@dataclass
class CiderScore:
    """CIDEr-D of a corpus.

    Attributes:
        score: the mean of ``per_caption`` (0 to 10 per n-gram order averaged; 10 for captions that
            equal all their references, less when the n-grams are common to every image).
        per_caption: the score of each candidate.
    """

    score: float
    per_caption: list[float]


def _weights(counts: Counter, df: Counter, log_images: float) -> tuple[dict, float]:
    vec = {g: k * (log_images - math.log(max(1, df[g]))) for g, k in counts.items()}
    return vec, math.sqrt(sum(w * w for w in vec.values()))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> CiderScore:
    """CIDEr-D of candidate captions; the document frequencies come from these references.

    Args:
        candidates: one caption per image.
        references: for each image, one or more reference captions.
        max_n: the longest n-gram.
        sigma: width of the Gaussian length penalty, in words.
    """
    _check_corpus(candidates, references, "cider_d")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive integer, got {max_n!r}")
    cand_words = [caption_words(c) for c in candidates]
    ref_words = [[caption_words(r) for r in refs] for refs in references]
    log_images = math.log(len(candidates))
    df = Counter()  # n-gram -> number of images whose references contain it
    for refs in ref_words:
        df.update({g for ref in refs for n in range(1, max_n + 1) for g in ngram_counts(ref, n)})
    per_caption = []
    for words, refs in zip(cand_words, ref_words):
        total = 0.0
        for n in range(1, max_n + 1):
            vc, norm_c = _weights(ngram_counts(words, n), df, log_images)
            for ref in refs:
                vr, norm_r = _weights(ngram_counts(ref, n), df, log_images)
                if norm_c == 0 or norm_r == 0:
                    continue
                dot = sum(min(w, vr[g]) * vr[g] for g, w in vc.items() if g in vr)
                penalty = math.exp(-((len(words) - len(ref)) ** 2) / (2 * sigma**2))
                total += penalty * dot / (norm_c * norm_r) / len(refs)
        per_caption.append(10.0 * total / max_n)
    return CiderScore(sum(per_caption) / len(per_caption), per_caption)
