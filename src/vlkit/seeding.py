"""The one seed mixer: every derived random stream (sampler order, caption choice, per-rank and per-epoch seeds,
per-item augmentation draws) is seeded by hashing its parts, so that no two (seed, epoch, rank, ...) combinations
share a stream, as ``seed + epoch`` would for (1, 0) and (0, 1)."""

from __future__ import annotations

import numpy as np

__all__ = ["mix_seed"]


def mix_seed(*values: int) -> int:
    """Hash non-negative ints into one 63-bit seed (numpy's ``SeedSequence``: well mixed, stable across versions)."""
    state = np.random.SeedSequence([int(value) for value in values]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)
