"""Seeds that depend only on what a sample is, never on which process or worker loads it.

Random augmentation draws from torch's global RNG. Seeding it per sample from stable parts (the
run's seed, the epoch, the sample's place) makes the drawn augmentation the same in every worker
layout and in a run resumed mid-epoch, and restoring the state afterwards leaves the caller's
stream untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

__all__ = ["mix_seed", "seeded_rng"]


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (unlike ``hash()``, the same in every process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``seed``; restore its state afterwards.

    Only the CPU generator: ``torch.manual_seed`` would also queue seeds for every accelerator
    backend, recording a stack trace for each (about 1.7 ms per sample, twice the cost of decoding
    and augmenting a small PNG).
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)
