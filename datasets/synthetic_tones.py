"""``tones``: synthesised tones with captions, the data the audio demo learns from.

A clip (1 s at 16 kHz by default) holds one tone described by three attributes: its waveform
(sine, square, sawtooth, triangle), its pitch band (low 150-300 Hz, medium 400-800 Hz, high
1200-2400 Hz) and its pattern (steady, pulsing on and off at 3-6 Hz, rising or falling glide).
Every instantaneous frequency stays inside the tone's band, glides included, and the waveforms are
built from their harmonics below 0.47 x the sample rate only, so they never alias and differ by
their overtones at every pitch (a triangle's third harmonic is 19 dB down, a square's 9.5 dB, a
sawtooth also has even ones). Loudness and a little white noise vary at random.

As with ``shapes``, the (waveform, pattern) pairs in ``UNSEEN_TONE_COMBOS`` never occur in
``"train"``; in ``"heldout"`` every third clip (indices 0, 3, 6, ...) uses one of them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .synthetic import check_split, dataset_index, sample_rng

__all__ = [
    "HELDOUT_UNSEEN_EVERY",
    "SEEN_TONE_COMBOS",
    "TONE_PATTERNS",
    "TONE_PITCHES",
    "TONE_PITCH_BANDS",
    "TONE_WAVEFORMS",
    "UNSEEN_TONE_COMBOS",
    "ToneSample",
    "TonesDataset",
    "make_tone_sample",
    "tone_prompts",
]

TONE_WAVEFORMS = ("sine", "square", "sawtooth", "triangle")
TONE_PITCH_BANDS = {"low": (150.0, 300.0), "medium": (400.0, 800.0), "high": (1200.0, 2400.0)}
TONE_PITCHES = tuple(TONE_PITCH_BANDS)
TONE_PATTERNS = ("steady", "pulsing", "rising", "falling")
# (waveform, pattern) pairs kept out of training: each waveform and each pattern exactly once.
UNSEEN_TONE_COMBOS = (("sine", "pulsing"), ("square", "rising"), ("sawtooth", "falling"), ("triangle", "steady"))
SEEN_TONE_COMBOS = tuple(c for c in itertools.product(TONE_WAVEFORMS, TONE_PATTERNS) if c not in UNSEEN_TONE_COMBOS)
HELDOUT_UNSEEN_EVERY = 3  # held-out index i uses an unseen combination iff i % 3 == 0
MIN_SAMPLE_RATE = 16000  # the third harmonic of the highest tone (7.2 kHz) must stay below Nyquist

_GLIDE_RATIO = (1.3, 1.7)  # end / start frequency of a glide, all inside the band (an octave wide)
_PULSE_HZ = (3.0, 6.0)
_FADE_SECONDS = 0.01  # raised-cosine fade at both ends, so clips start and stop without a click
_TABLE_SIZE = 4096
_MAX_HARMONICS = 64

# {pattern} = "rising", {pitch} = "low", {wave} = "sine", {verb} = "rises", {register} = "in the low register".
_TEMPLATES = (
    "a {pattern} {pitch} {wave} tone",
    "a {pitch} {wave} wave that {verb}",
    "a {pattern} {wave} sound {register}",
    "{pitch} {wave} tone, {pattern}",
    "the sound of a {pattern} {wave} wave at {pitch} pitch",
    "a {pitch}-pitched {wave} tone that {verb}",
    "a {wave} tone, {pitch} and {pattern}",
)
_HELDOUT_TEMPLATE = _TEMPLATES[0]
_VERBS = {"steady": "stays steady", "pulsing": "pulses", "rising": "rises", "falling": "falls"}
_REGISTERS = {"low": "in the low register", "medium": "in the middle register", "high": "in the high register"}


@dataclass(frozen=True)
class ToneSample:
    """One generated clip with its caption.

    Attributes:
        audio: mono waveform, float32 ``(num_samples,)`` in [-1, 1].
        sample_rate: samples per second.
        caption: text naming the waveform, pitch and pattern.
        attrs: JSON-able labels: ``waveform``, ``pitch``, ``pattern``; ``start_hz`` and ``end_hz``
            (equal unless gliding); ``pulse_hz`` (``None`` unless pulsing); ``amplitude`` (peak of
            the tone before noise); ``unseen``: whether (waveform, pattern) is in
            ``UNSEEN_TONE_COMBOS``; ``mentions``: the attributes the caption states.
    """

    audio: np.ndarray
    sample_rate: int
    caption: str
    attrs: dict[str, Any]


def tone_prompts() -> dict[str, tuple[list[str], list[str]]]:
    """Zero-shot class names and templates for each attribute: ``{"waveform": (names, templates), ...}``.

    Templates are the captions' main wording ("a rising low sine tone") with the attribute left
    open and the other two filled in every way, so each class's averaged prompt favours no value
    of the other attributes.
    """
    return {
        "waveform": (
            list(TONE_WAVEFORMS),
            [f"a {pat} {pit} {{}} tone" for pat, pit in itertools.product(TONE_PATTERNS, TONE_PITCHES)],
        ),
        "pitch": (
            list(TONE_PITCHES),
            [f"a {pat} {{}} {wave} tone" for pat, wave in itertools.product(TONE_PATTERNS, TONE_WAVEFORMS)],
        ),
        "pattern": (
            list(TONE_PATTERNS),
            [f"a {{}} {pit} {wave} tone" for pit, wave in itertools.product(TONE_PITCHES, TONE_WAVEFORMS)],
        ),
    }


@cache
def _wavetable(waveform: str, harmonics: int) -> np.ndarray:
    """One period of ``waveform`` from its first ``harmonics`` partials, peak 1, one sample wrapped around."""
    x = np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE
    k = np.arange(1, harmonics + 1)[:, None]  # (K, 1)
    if waveform == "sine":
        gains = (k == 1).astype(np.float64)
    elif waveform == "square":
        gains = (k % 2 == 1) / k
    elif waveform == "sawtooth":
        gains = 1.0 / k
    elif waveform == "triangle":
        # Odd partials at 1/k^2 with alternating sign.
        gains = (k % 2 == 1) * np.where((k // 2) % 2 == 0, 1.0, -1.0) / k**2
    else:
        raise ValueError(f"unknown waveform {waveform!r}; expected one of {TONE_WAVEFORMS}")
    table = (gains * np.sin(2 * np.pi * k * x)).sum(axis=0)  # (TABLE_SIZE + 1,)
    table /= np.abs(table).max()
    table = table.astype(np.float32)
    table.flags.writeable = False
    return table


def _oscillator(waveform: str, frequency: np.ndarray, sample_rate: int, phase: float, max_hz: float) -> np.ndarray:
    """Band-limited ``waveform`` following the per-sample ``frequency`` (Hz), starting at ``phase`` cycles."""
    harmonics = int(min(_MAX_HARMONICS, max(1, math.floor(0.47 * sample_rate / max_hz))))
    table = _wavetable(waveform, harmonics)
    cycles = phase + np.cumsum(frequency / sample_rate)
    position = (cycles - np.floor(cycles)) * _TABLE_SIZE
    lower = position.astype(np.int64)
    weight = (position - lower).astype(np.float32)
    return table[lower] + weight * (table[lower + 1] - table[lower])


def _caption(rng: np.random.Generator, waveform: str, pitch: str, pattern: str, template: str | None) -> str:
    if template is None:
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(
        pattern=pattern, pitch=pitch, wave=waveform, verb=_VERBS[pattern], register=_REGISTERS[pitch]
    )


def make_tone_sample(
    index: int,
    split: str = "train",
    seed: int = 0,
    sample_rate: int = 16000,
    clip_seconds: float = 1.0,
) -> ToneSample:
    """Generate clip ``index`` of ``split``; the same arguments always give the same clip.

    Args:
        index: position in the split (any non-negative integer).
        split: ``"train"`` or ``"heldout"``.
        seed: data set seed.
        sample_rate: samples per second, at least 16000 (so high tones keep their overtones).
        clip_seconds: clip length, at least 0.25 s (so a pulsing tone pulses at least once).
    """
    split_id = check_split(split)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be an integer >= {MIN_SAMPLE_RATE} Hz, got {sample_rate!r}")
    if not clip_seconds >= 0.25:
        raise ValueError(f"clip_seconds must be at least 0.25, got {clip_seconds!r}")
    rng = sample_rng("tones", seed, split, index)
    unseen = split_id == 1 and index % HELDOUT_UNSEEN_EVERY == 0
    pool = UNSEEN_TONE_COMBOS if unseen else SEEN_TONE_COMBOS
    waveform, pattern = pool[int(rng.integers(len(pool)))]
    pitch = TONE_PITCHES[int(rng.integers(len(TONE_PITCHES)))]
    low, high = TONE_PITCH_BANDS[pitch]

    num_samples = round(sample_rate * clip_seconds)
    t = np.arange(num_samples) / sample_rate
    if pattern in ("rising", "falling"):
        # An exponential glide between two frequencies of the band (pitch moves evenly on a log scale).
        ratio = rng.uniform(*_GLIDE_RATIO)
        start = low * math.exp(rng.uniform(0, math.log(high / low / ratio)))
        start, end = (start, start * ratio) if pattern == "rising" else (start * ratio, start)
        frequency = start * (end / start) ** (t / (num_samples / sample_rate))
    else:
        start = end = low * math.exp(rng.uniform(0, math.log(high / low)))
        frequency = np.full(num_samples, start)
    tone = _oscillator(waveform, frequency, sample_rate, float(rng.random()), max(start, end))

    envelope = np.ones(num_samples, dtype=np.float32)
    pulse_hz = None
    if pattern == "pulsing":
        pulse_hz = float(rng.uniform(*_PULSE_HZ))
        # A square-ish gate with soft (about 10 ms) edges.
        gate = np.sin(2 * np.pi * pulse_hz * t + rng.uniform(0, 2 * np.pi))
        envelope = (0.5 + 0.5 * np.tanh(8.0 * gate)).astype(np.float32)
    fade = max(1, round(_FADE_SECONDS * sample_rate))
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))).astype(np.float32)
    envelope[:fade] *= ramp
    envelope[-fade:] *= ramp[::-1]

    amplitude = float(rng.uniform(0.2, 0.8))
    noise = rng.standard_normal(num_samples, dtype=np.float32) * np.float32(amplitude * rng.uniform(0.002, 0.01))
    audio = np.clip(amplitude * envelope * tone + noise, -1.0, 1.0).astype(np.float32)
    caption = _caption(rng, waveform, pitch, pattern, _HELDOUT_TEMPLATE if split_id == 1 else None)
    attrs = {
        "waveform": waveform,
        "pitch": pitch,
        "pattern": pattern,
        "start_hz": float(start),
        "end_hz": float(end),
        "pulse_hz": pulse_hz,
        "amplitude": amplitude,
        "unseen": (waveform, pattern) in UNSEEN_TONE_COMBOS,
        "mentions": ["waveform", "pitch", "pattern"],  # every caption states all three
    }
    return ToneSample(audio=audio, sample_rate=sample_rate, caption=caption, attrs=attrs)


class TonesDataset(Dataset):
    """Map-style dataset of ``n`` tone clips generated on the fly (see ``make_tone_sample``).

    Items are ``{"audio": float32 tensor (num_samples,), "text": token ids (L,) if a tokenizer is
    given, "meta": {"caption": ..., **attrs}}``.

    Args:
        split: ``"train"`` or ``"heldout"``.
        n: number of clips.
        seed: data set seed.
        sample_rate: samples per second.
        clip_seconds: clip length in seconds.
        tokenizer: maps a list of strings to ``(B, L)`` token ids (e.g. ``CLIPTokenizer``).
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 10000,
        seed: int = 0,
        sample_rate: int = 16000,
        clip_seconds: float = 1.0,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        check_split(split)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.split, self.n, self.seed = split, n, seed
        self.options = {"sample_rate": sample_rate, "clip_seconds": clip_seconds}
        self.tokenizer = tokenizer
        make_tone_sample(0, split, seed, **self.options)  # reject bad options now, not in a worker

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = dataset_index(index, self.n, type(self).__name__)
        sample = make_tone_sample(index, self.split, self.seed, **self.options)
        item: dict[str, Any] = {"audio": torch.from_numpy(sample.audio)}
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([sample.caption])[0]
        item["meta"] = {"caption": sample.caption, "index": index, **sample.attrs}
        return item
