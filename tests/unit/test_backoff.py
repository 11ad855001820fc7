from __future__ import annotations

import random

from zeroloss.backoff import backoff_s


def test_backoff_grows_exponentially_within_jitter_bounds_and_caps() -> None:
    rng = random.Random(1)
    assert backoff_s(0, 0.5, 60, rng) == 0.0
    for attempts in range(1, 40):
        full = min(60.0, 0.5 * 2 ** (attempts - 1))
        for _ in range(50):
            d = backoff_s(attempts, 0.5, 60, rng)
            assert full / 2 <= d <= full
    assert max(backoff_s(1000, 0.5, 60, rng) for _ in range(100)) <= 60


def test_backoff_jitter_spreads_relays_apart() -> None:
    rng = random.Random(2)
    assert len({round(backoff_s(5, 1, 60, rng), 6) for _ in range(50)}) > 40
