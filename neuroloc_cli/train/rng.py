"""Seeds derived from the run's seed and a counter: an optimizer step, or a pass over a corpus.

Every random draw of a run — which corpus fills each slot of a batch, the order of a corpus's
rows, dropout — is seeded from (seed, counter) alone, never from a generator carried from step
to step, so that a run resumed at step k draws exactly what an uninterrupted run draws from
step k on.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, counter: int) -> int:
    """A 63-bit seed for draw `counter` of a run seeded `seed`.

    A hash rather than `seed + counter`, so that neighbouring seeds or counters give unrelated
    streams (seed 1 at step 0 must not repeat seed 0 at step 1).
    """
    digest = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
