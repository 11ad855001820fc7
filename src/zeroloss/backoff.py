"""Exponential backoff with jitter and a cap, in seconds."""

from __future__ import annotations

import random


def backoff_s(attempts: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before attempt number ``attempts + 1``: ``base·2^(attempts-1)``, capped, then
    "equal jitter" (uniform in [d/2, d]) so retries from many relays do not move in lockstep
    while the delay still grows."""
    if attempts <= 0:
        return 0.0
    delay = min(cap_s, base_s * 2.0 ** min(attempts - 1, 62))
    r = (rng or random).random()
    return delay / 2 + r * delay / 2
