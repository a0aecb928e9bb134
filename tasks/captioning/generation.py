"""Caption generation: greedy decoding, beam search, and top-k / top-p sampling, batched.

Every function takes a ``CaptionDecoder`` (or a ``TextTowerDecoder``, CoCa's text tower and multimodal
decoder, which offers the same interface) and image tokens ``(B, N, memory_dim)`` and returns the
generated ids after the start-of-text token: ``(B, T)``, each row ending at its end-of-text token
and padded after it, ``T`` at most ``max_length``. With ``use_cache=True`` (the default) each step
feeds one token through the decoder's key/value cache; ``use_cache=False`` re-reads the whole prefix
every step, which gives the same tokens much more slowly and is kept as a reference.

Two length rules are optional: ``min_length`` keeps end-of-text from coming before a caption has that
many tokens (end-of-text included), and ``eos_at_max_length`` ends a caption that reaches
``max_length`` with end-of-text as its last token instead of cutting it there. With
``max_length = seq_len - 1``, ``min_length = min_seq_len`` and ``eos_at_max_length=True``, greedy
search follows the stopping rules of open_clip's ``CoCa.generate`` (``generation_type="top_k"``,
``top_k=1``), but for one: open_clip also ends a caption that emits the padding id (0, the CLIP
tokenizer's "!"), where these functions keep going.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import CaptionDecoder
from .multimodal_decoder import TextTowerDecoder

# what the searches drive: a decoder over token ids, or CoCa's text tower and multimodal decoder together
Decoder = CaptionDecoder | TextTowerDecoder


@dataclass
class BeamSearchOutput:
    """What ``beam_search`` returns.

    Attributes:
        tokens: ``(B, T)`` the best hypothesis of each image.
        scores: ``(B,)`` its length-normalised log-probability.
        beams: ``(B, num_beams, T)`` all kept hypotheses, best first.
        beam_scores: ``(B, num_beams)`` their length-normalised log-probabilities.
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    beams: torch.Tensor
    beam_scores: torch.Tensor


class _Stepper:
    """Next-token logits of running sequences, through the key/value cache or by re-reading each prefix."""

    def __init__(self, decoder: Decoder, image_tokens: torch.Tensor, use_cache: bool) -> None:
        self.decoder = decoder
        self.image_tokens = image_tokens
        self.cache = decoder.init_cache(image_tokens) if use_cache else None

    def next_logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """``(R, V)`` float logits of the token after each row of ``seqs (R, t)``."""
        if self.cache is None:
            return self.decoder(seqs, self.image_tokens)[:, -1].float()
        new = seqs[:, self.cache.length :]  # the start token first, then one token per step
        return self.decoder.step(new, self.cache)[:, -1].float()

    def keep(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the running batch, in that order."""
        if self.cache is None:
            self.image_tokens = self.image_tokens[index]
        else:
            self.cache.reorder(index)


def _check_max_length(decoder: Decoder, max_length: int | None) -> int:
    limit = decoder.context_length - 1  # the start token takes one position
    if max_length is None:
        return limit
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
        raise ValueError(
            f"max_length must be an integer in [1, {limit}] (the decoder covers {decoder.context_length} "
            f"positions, one of them the start token), got {max_length!r}"
        )
    return max_length


@dataclass
class _LengthRules:
    """When end-of-text may come (not before ``min_length`` tokens) and must (at ``max_length``, if forced)."""

    eos_column: int
    max_length: int
    min_length: int
    eos_at_max_length: bool

    def apply(self, logits: torch.Tensor, t: int) -> torch.Tensor:
        """``logits (R, V)`` of the ``t``-th generated token (from 0) with the rules applied."""
        if t + 1 < self.min_length:
            logits = logits.clone()
            logits[:, self.eos_column] = float("-inf")
        elif self.eos_at_max_length and t == self.max_length - 1:
            forced = torch.full_like(logits, float("-inf"))
            forced[:, self.eos_column] = logits[:, self.eos_column]
            logits = forced
        return logits


def _length_rules(
    decoder: Decoder, max_length: int, min_length: int, eos_at_max_length: bool, device: torch.device
) -> _LengthRules:
    if isinstance(min_length, bool) or not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(
            f"min_length must be an integer in [0, {max_length}] (max_length), end-of-text included; got {min_length!r}"
        )
    eos_column = int(decoder.to_columns(torch.tensor([decoder.eos_token_id], device=device))[0])
    return _LengthRules(eos_column, max_length, min_length, bool(eos_at_max_length))


def _start(decoder: Decoder, image_tokens: torch.Tensor, rows: int) -> torch.Tensor:
    decoder._check_memory(image_tokens)
    return torch.full((rows, 1), decoder.bos_token_id, dtype=torch.long, device=image_tokens.device)


def _autoregress(decoder, image_tokens, rules: _LengthRules, choose, use_cache) -> torch.Tensor:
    """Extend every row one chosen token at a time; rows that emit end-of-text leave the batch."""
    B, max_length = image_tokens.shape[0], rules.max_length
    seqs = _start(decoder, image_tokens, B)
    out = torch.full((B, max_length), decoder.pad_token_id, dtype=torch.long, device=image_tokens.device)
    stepper = _Stepper(decoder, image_tokens, use_cache)
    rows = torch.arange(B, device=image_tokens.device)
    steps = 0
    for t in range(max_length):
        token = decoder.to_ids(choose(rules.apply(stepper.next_logits(seqs), t)))  # (R,)
        out[rows, t] = token
        seqs = torch.cat([seqs, token[:, None]], dim=1)  # (R, t + 2)
        steps = t + 1
        alive = token != decoder.eos_token_id
        if not bool(alive.all()):
            if not bool(alive.any()):
                break
            keep = alive.nonzero().squeeze(1)
            rows, seqs = rows[keep], seqs[keep]
            stepper.keep(keep)
    return out[:, :steps]


@torch.no_grad()
def greedy_search(
    decoder: Decoder,
    image_tokens: torch.Tensor,
    max_length: int | None = None,
    use_cache: bool = True,
    min_length: int = 0,
    eos_at_max_length: bool = False,
) -> torch.Tensor:
    """The most likely token at every step; returns ``(B, T)`` ids (see the module docstring).

    Args:
        decoder: the caption decoder.
        image_tokens: ``(B, N, memory_dim)`` image encoder tokens.
        max_length: most tokens to generate per caption, end-of-text included
            (default: as many as the decoder's positions allow).
        use_cache: feed one token per step through the key/value cache.
        min_length: fewest tokens per caption, end-of-text included; end-of-text is not chosen before.
        eos_at_max_length: a caption that reaches ``max_length`` ends with end-of-text there.
    """
    max_length = _check_max_length(decoder, max_length)
    rules = _length_rules(decoder, max_length, min_length, eos_at_max_length, image_tokens.device)
    return _autoregress(decoder, image_tokens, rules, lambda logits: logits.argmax(dim=-1), use_cache)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Scale ``logits (R, V)`` by ``1 / temperature`` and set those outside the top-k / top-p set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probabilities sum to at least ``top_p``
    (always at least the most likely token); with both, a token must pass both filters.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p  # the set already reached top_p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(
    decoder: Decoder,
    image_tokens: torch.Tensor,
    max_length: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    min_length: int = 0,
    eos_at_max_length: bool = False,
) -> torch.Tensor:
    """Draw each token from the (temperature-scaled, top-k / top-p filtered) distribution; ``(B, T)`` ids.

    Args:
        decoder: the caption decoder.
        image_tokens: ``(B, N, memory_dim)``.
        max_length: most tokens to generate per caption, end-of-text included.
        temperature: below 1 sharpens the distribution, above 1 flattens it.
        top_k: sample only among the ``top_k`` most likely tokens.
        top_p: sample only among the most likely tokens that together hold ``top_p`` of the probability.
        generator: random generator for reproducible draws (on the device of ``image_tokens``).
        use_cache: feed one token per step through the key/value cache.
        min_length: fewest tokens per caption, end-of-text included; end-of-text is not drawn before.
        eos_at_max_length: a caption that reaches ``max_length`` ends with end-of-text there.
    """
    max_length = _check_max_length(decoder, max_length)
    filter_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # reject bad options before any work
    rules = _length_rules(decoder, max_length, min_length, eos_at_max_length, image_tokens.device)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _autoregress(decoder, image_tokens, rules, choose, use_cache)


def _length_norm(length: int | torch.Tensor, alpha: float):
    return length**alpha


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    image_tokens: torch.Tensor,
    num_beams: int = 3,
    max_length: int | None = None,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    min_length: int = 0,
    eos_at_max_length: bool = False,
) -> BeamSearchOutput:
    """Beam search, batched over images, ranking hypotheses by ``log p / length ** length_penalty``.

    Each step expands every running beam by every token and keeps the ``2 * num_beams`` best
    candidates by total log-probability: those ending in end-of-text join the image's finished
    hypotheses (the ``num_beams`` best by normalised score are kept), the best ``num_beams`` others
    keep running. An image is done once no running beam can still beat its worst finished
    hypothesis; beams that reach ``max_length`` without end-of-text are finished as they are.

    Args:
        decoder: the caption decoder.
        image_tokens: ``(B, N, memory_dim)``.
        num_beams: hypotheses kept per image.
        max_length: most tokens per caption, end-of-text included.
        length_penalty: exponent ``alpha`` of the length normalisation; 0 ranks by total
            log-probability (favouring short captions), larger values favour longer ones.
        use_cache: feed one token per step through the key/value cache.
        min_length: fewest tokens per caption, end-of-text included; no hypothesis ends before.
        eos_at_max_length: hypotheses that reach ``max_length`` end with end-of-text there.
    """
    max_length = _check_max_length(decoder, max_length)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    rules = _length_rules(decoder, max_length, min_length, eos_at_max_length, image_tokens.device)
    K, V = num_beams, decoder.num_tokens
    B = image_tokens.shape[0]
    device = image_tokens.device
    pad, eos = decoder.pad_token_id, decoder.eos_token_id
    seqs = _start(decoder, image_tokens, B * K)  # (B*K, 1), beams of an image next to each other
    stepper = _Stepper(decoder, image_tokens.repeat_interleave(K, dim=0), use_cache)
    neg_inf = float("-inf")
    running = torch.zeros(B, K, device=device)
    running[:, 1:] = neg_inf  # all beams start identical: expand only the first at step 0
    fin_scores = torch.full((B, K), neg_inf, device=device)
    fin_tokens = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    offsets = (torch.arange(B, device=device) * K)[:, None]  # (B, 1)

    for t in range(max_length):
        logp = rules.apply(stepper.next_logits(seqs).log_softmax(dim=-1), t).view(B, K, V)
        cand = running[:, :, None] + logp  # (B, K, V)
        top_scores, top_idx = cand.view(B, K * V).topk(2 * K, dim=-1)  # (B, 2K)
        parent, token = top_idx // V, decoder.to_ids(top_idx % V)
        prev = seqs[:, 1:].view(B, K, t).gather(1, parent[..., None].expand(B, 2 * K, t))  # (B, 2K, t)
        cand_seqs = torch.cat([prev, token[..., None]], dim=-1)  # (B, 2K, t + 1)

        # candidates that end here join the finished hypotheses
        is_eos = token == eos
        ended = torch.where(is_eos & ~done[:, None], top_scores / _length_norm(t + 1, length_penalty), neg_inf)
        padded = torch.full((B, 2 * K, max_length), pad, dtype=torch.long, device=device)
        padded[:, :, : t + 1] = cand_seqs
        fin_scores, fin_tokens = _keep_best(fin_scores, fin_tokens, ended, padded, K)

        # the best candidates that did not end keep running
        live = top_scores.masked_fill(is_eos, neg_inf)
        running, order = live.topk(K, dim=-1)  # (B, K)
        rows = (offsets + parent.gather(1, order)).view(-1)  # (B*K,) parent rows of the kept beams
        seqs = torch.cat([seqs[rows], token.gather(1, order).view(-1, 1)], dim=1)  # (B*K, t + 2)
        stepper.keep(rows)

        # done: no running beam can still beat the worst kept finished hypothesis
        longest = max_length if length_penalty >= 0 else min(t + 2, max_length)
        best_possible = running[:, 0] / _length_norm(longest, length_penalty)
        done |= (fin_scores[:, -1] > neg_inf) & (fin_scores[:, -1] >= best_possible)
        if bool(done.all()) or t == max_length - 1:
            break

    # images still searching at max_length: their running beams finish as they are
    steps = seqs.shape[1] - 1
    truncated = torch.where(done[:, None], neg_inf, running / _length_norm(steps, length_penalty))
    padded = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)
    padded[:, :, :steps] = seqs[:, 1:].view(B, K, steps)
    fin_scores, fin_tokens = _keep_best(fin_scores, fin_tokens, truncated, padded, K)

    used = _used_length(fin_tokens, eos, max_length)
    beams = fin_tokens[:, :, :used]
    return BeamSearchOutput(tokens=beams[:, 0], scores=fin_scores[:, 0], beams=beams, beam_scores=fin_scores)


def _keep_best(scores, tokens, new_scores, new_tokens, k):
    """Merge two scored sets of hypotheses ``(B, n)`` / ``(B, n, L)`` and keep the ``k`` best, best first."""
    all_scores = torch.cat([scores, new_scores], dim=1)
    all_tokens = torch.cat([tokens, new_tokens], dim=1)
    best, index = all_scores.topk(k, dim=1)
    return best, all_tokens.gather(1, index[..., None].expand(-1, -1, all_tokens.shape[-1]))


def _used_length(tokens: torch.Tensor, eos: int, max_length: int) -> int:
    """Columns needed to hold every hypothesis up to its end-of-text token (all of a row without one)."""
    is_eos = tokens == eos
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, torch.full_like(tokens[..., 0], max_length))
    return int(first.max()) if first.numel() else 0


@torch.no_grad()
def generate(
    decoder: Decoder,
    image_tokens: torch.Tensor,
    max_length: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    min_length: int = 0,
    eos_at_max_length: bool = False,
) -> torch.Tensor:
    """Generate caption ids ``(B, T)``: greedy (the default), beam search (``num_beams > 1``) or sampling.

    Args:
        decoder: the caption decoder.
        image_tokens: ``(B, N, memory_dim)``.
        max_length: most tokens per caption, end-of-text included.
        num_beams: beam width; 1 is greedy (or sampling with ``do_sample``).
        length_penalty: beam search's length normalisation exponent.
        do_sample: draw tokens at random (with ``temperature``, ``top_k``, ``top_p``).
        temperature: sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens.
        top_p: sample among the most likely tokens holding ``top_p`` of the probability.
        generator: random generator for sampling.
        use_cache: feed one token per step through the key/value cache.
        min_length: fewest tokens per caption, end-of-text included.
        eos_at_max_length: a caption that reaches ``max_length`` ends with end-of-text there.
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    length_rules = (min_length, eos_at_max_length)
    if do_sample:
        if num_beams > 1:
            raise ValueError("choose beam search (num_beams > 1) or sampling (do_sample=True), not both")
        return sample(decoder, image_tokens, max_length, temperature, top_k, top_p, generator, use_cache, *length_rules)
    if top_k is not None or top_p is not None or temperature != 1.0:
        raise ValueError("temperature, top_k and top_p apply to sampling only; pass do_sample=True")
    if num_beams > 1:
        return beam_search(
            decoder, image_tokens, num_beams, max_length, length_penalty, use_cache, *length_rules
        ).tokens
    return greedy_search(decoder, image_tokens, max_length, use_cache, *length_rules)
