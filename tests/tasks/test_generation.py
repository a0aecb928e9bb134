"""Caption generation: greedy, beam search and sampling against naive references; the key/value cache."""

from __future__ import annotations

import time

import pytest
import torch

from polymodal.tasks.captioning import (
    CaptionDecoder,
    beam_search,
    filter_logits,
    generate,
    greedy_search,
    sample,
)

BOS, EOS = 6, 7
EOS_SMALL = 4  # end-of-text of the 5-token decoder


def make_decoder(vocab_size: int = 8, context_length: int = 12, seed: int = 0) -> CaptionDecoder:
    """A tiny random decoder whose captions end at different steps (an untied head and strong positions)."""
    torch.manual_seed(seed)
    decoder = CaptionDecoder(
        vocab_size=vocab_size,
        context_length=context_length,
        width=32,
        layers=2,
        heads=4,
        memory_dim=24,
        tie_embeddings=False,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    ).eval()
    with torch.no_grad():
        decoder.pos_embed.normal_(std=1.0)
        decoder.lm_head.weight.normal_(std=0.5)
    return decoder


def image_tokens(batch: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 5, 24, generator=torch.Generator().manual_seed(seed)) * 3


@torch.no_grad()
def naive_greedy(decoder: CaptionDecoder, memory: torch.Tensor, max_length: int) -> list[list[int]]:
    """One image at a time, re-reading the whole prefix every step, until end-of-text."""
    out = []
    for b in range(memory.shape[0]):
        seq = [decoder.bos_token_id]
        while len(seq) <= max_length:
            seq.append(int(decoder(torch.tensor([seq]), memory[b : b + 1])[0, -1].argmax()))
            if seq[-1] == decoder.eos_token_id:
                break
        out.append(seq[1:])
    return out


def rows(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Generated rows cut after their end-of-text token, checking that only padding follows it."""
    cut = []
    for row in tokens.tolist():
        if eos in row:
            end = row.index(eos) + 1
            assert all(t == 0 for t in row[end:]), f"tokens after end-of-text must be padding: {row}"
            row = row[:end]
        cut.append(row)
    return cut


@torch.no_grad()
def sequence_logprob(decoder: CaptionDecoder, memory: torch.Tensor, seq: list[int]) -> float:
    logits = decoder(torch.tensor([[decoder.bos_token_id, *seq[:-1]]]), memory)[0].log_softmax(-1)
    return float(logits[torch.arange(len(seq)), torch.tensor(seq)].sum())


def test_greedy_matches_naive_decoding_with_and_without_cache():
    decoder, memory = make_decoder(), image_tokens()
    expected = naive_greedy(decoder, memory, max_length=11)
    lengths = {len(r) for r in expected}
    assert len(lengths) > 2 and min(lengths) < 11, "the fixture should end captions at different steps"
    for use_cache in (True, False):
        out = greedy_search(decoder, memory, use_cache=use_cache)
        assert out.dtype == torch.long and out.shape == (8, max(lengths))
        assert rows(out, EOS) == expected
    # max_length cuts captions short
    short = greedy_search(decoder, memory, max_length=3)
    assert short.shape == (8, 3)
    assert rows(short, EOS) == [r[:3] for r in expected]


def test_cache_gives_the_same_logits_as_the_full_sequence():
    decoder, memory = make_decoder(), image_tokens(3)
    tokens = torch.randint(0, 8, (3, 9))
    full = decoder(tokens, memory)
    cache = decoder.init_cache(memory)
    first = decoder.step(tokens[:, :4], cache)  # a block of several positions, then one at a time
    steps = [first] + [decoder.step(tokens[:, t : t + 1], cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 9
    with pytest.raises(ValueError, match="covers 12 positions"):
        decoder.step(torch.zeros(3, 4, dtype=torch.long), cache)


@torch.no_grad()
def every_caption(decoder, memory, max_length):
    """Every possible caption (ended by end-of-text, or cut at max_length) with its log-probability,
    scoring all prefixes of one length in one batch."""
    done, prefixes, scores = [], [[]], [0.0]
    for length in range(1, max_length + 1):
        seqs = torch.tensor([[decoder.bos_token_id, *p] for p in prefixes])
        logp = decoder(seqs, memory.expand(len(prefixes), -1, -1))[:, -1].log_softmax(-1).tolist()
        grown, grown_scores = [], []
        for prefix, score, row in zip(prefixes, scores, logp):
            for token, lp in enumerate(row):
                if token == decoder.eos_token_id or length == max_length:
                    done.append(([*prefix, token], score + lp))
                else:
                    grown.append([*prefix, token])
                    grown_scores.append(score + lp)
        prefixes, scores = grown, grown_scores
    return done


def test_beam_search_with_enough_beams_finds_the_best_caption():
    # 5 tokens and captions of at most 3: with 16 beams nothing is ever pruned, so beam search must
    # return the exhaustive optimum of log p / length ** alpha
    decoder, memory = make_decoder(vocab_size=5, context_length=4, seed=2), image_tokens(4)
    captions = [every_caption(decoder, memory[b : b + 1], 3) for b in range(4)]
    assert len(captions[0]) == 1 + 4 + 16 * 5
    results = {}
    for alpha in (0.0, 1.0, 2.0):
        best = [max((score / len(seq) ** alpha, seq) for seq, score in c) for c in captions]
        results[alpha] = [seq for _, seq in best]
        for use_cache in (True, False):
            out = beam_search(decoder, memory, num_beams=16, length_penalty=alpha, use_cache=use_cache)
            assert rows(out.tokens, decoder.eos_token_id) == [seq for _, seq in best]
            assert out.scores.tolist() == pytest.approx([score for score, _ in best], abs=1e-5)
            assert out.beams.shape[:2] == (4, 16)
            assert (out.beam_scores[:, :-1] >= out.beam_scores[:, 1:]).all(), "beams are sorted best first"
    # the fixture makes the length penalty matter: image 3's best caption ends early at alpha 0, not at 2
    assert results[0.0][3] == [0, EOS_SMALL] and results[2.0][3] == [0, 0, 0]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_search_scores_and_greedy_bound(alpha):
    decoder, memory = make_decoder(), image_tokens()
    greedy = rows(greedy_search(decoder, memory), EOS)
    for k in (1, 3):
        out = beam_search(decoder, memory, num_beams=k, length_penalty=alpha)
        assert (out.tokens == out.beams[:, 0]).all()
        for b, seq in enumerate(rows(out.tokens, EOS)):
            # the reported score is the length-normalised log-probability of the returned caption
            expected = sequence_logprob(decoder, memory[b : b + 1], seq) / len(seq) ** alpha
            assert float(out.scores[b]) == pytest.approx(expected, abs=1e-4)
            if k == 1:  # one beam follows the greedy path and keeps its caption among the finished ones
                g = greedy[b]
                assert float(out.scores[b]) >= sequence_logprob(decoder, memory[b : b + 1], g) / len(g) ** alpha - 1e-5


def test_beam_search_cache_gives_the_same_beams():
    decoder, memory = make_decoder(), image_tokens()
    cached = beam_search(decoder, memory, num_beams=3)
    plain = beam_search(decoder, memory, num_beams=3, use_cache=False)
    assert torch.equal(cached.beams, plain.beams)
    torch.testing.assert_close(cached.beam_scores, plain.beam_scores)
    # beam search is not greedy here: at least one image gets a better caption
    greedy = greedy_search(decoder, memory)
    assert any(a != b for a, b in zip(rows(cached.tokens, EOS), rows(greedy, EOS)))


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    # top-p: the smallest most likely set holding at least p: 0.5 + 0.3 reaches 0.8 exactly
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False]  # always the most likely
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [True, True, False, False]
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    # the order of tokens does not matter
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.8)) == [False, True, False, True]
    for bad in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)


def test_sampling_draws_from_the_filtered_distribution():
    decoder = make_decoder()
    memory = image_tokens(1).expand(4000, -1, -1)
    with torch.no_grad():
        probs = decoder(torch.full((1, 1), BOS), memory[:1])[0, -1].softmax(-1)
    top2 = probs.topk(2)
    g = torch.Generator().manual_seed(0)
    first = sample(decoder, memory, max_length=1, top_k=2, generator=g)[:, 0]
    assert set(first.tolist()) == set(top2.indices.tolist())
    share = (first == top2.indices[0]).float().mean()
    expected = top2.values[0] / top2.values.sum()
    assert abs(float(share - expected)) < 0.03  # ~4 standard deviations of a 4000-draw share
    # top_k=1 is greedy; the same generator seed gives the same draws with and without the cache
    memory = image_tokens()
    assert torch.equal(sample(decoder, memory, top_k=1), greedy_search(decoder, memory))
    a = sample(decoder, memory, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = sample(decoder, memory, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)
    rows(a, EOS)  # padding after end-of-text


def test_generate_dispatch_and_errors():
    decoder, memory = make_decoder(), image_tokens()
    assert torch.equal(generate(decoder, memory), greedy_search(decoder, memory))
    assert torch.equal(generate(decoder, memory, num_beams=3), beam_search(decoder, memory, 3).tokens)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        generate(decoder, memory, do_sample=True, top_k=3, generator=g1), sample(decoder, memory, top_k=3, generator=g2)
    )
    with pytest.raises(ValueError, match="not both"):
        generate(decoder, memory, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="do_sample=True"):
        generate(decoder, memory, top_k=5)
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[1, 11\]"):
        generate(decoder, memory, max_length=12)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(decoder, memory, num_beams=0)
    with pytest.raises(ValueError, match=r"\(B, N, 24\) image tokens"):
        greedy_search(decoder, torch.randn(2, 5, 16))


def test_cache_is_faster_on_long_captions():
    # 32 tokens per caption from a decoder that never ends early: with the cache each step feeds one
    # token, without it the whole prefix (quadratic work); measured 4x faster here (1.5x with 8 captions of
    # width 64, where per-step overhead dominates)
    torch.manual_seed(0)
    decoder = CaptionDecoder(
        vocab_size=64,
        context_length=33,
        width=128,
        layers=2,
        heads=4,
        tie_embeddings=False,
        bos_token_id=62,
        eos_token_id=63,
    ).eval()
    with torch.no_grad():
        decoder.lm_head.weight[63] = 0.0  # end-of-text scores 0, below the best of 63 random logits
    memory = torch.randn(32, 10, 128)

    def best_time(use_cache: bool) -> tuple[float, torch.Tensor]:
        times, out = [], None
        for _ in range(2):
            start = time.perf_counter()
            out = greedy_search(decoder, memory, max_length=32, use_cache=use_cache)
            times.append(time.perf_counter() - start)
        return min(times), out

    cached, out_cached = best_time(True)
    uncached, out_plain = best_time(False)
    print(f"greedy, 32 captions x 32 tokens: cached {cached * 1000:.0f} ms, uncached {uncached * 1000:.0f} ms")
    assert out_cached.shape == (32, 32) and torch.equal(out_cached, out_plain)
    assert cached < uncached
