"""Smooth weighted round-robin over a channel's providers (nginx's algorithm).

Each pick adds every candidate's weight to its running score, takes the highest, and subtracts
the candidates' total from the winner: weights 5:1:1 give a a b a c a a, spread out rather than
in runs. Scores are per process (each worker balances its own share); candidates are the
providers the caller found callable now (enabled, healthy, breaker permitting), minus those this
try already used, so a failover within a try never picks the same provider twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Balancer:
    def __init__(self) -> None:
        self._scores: dict[int, int] = {}
        self._lock = threading.Lock()  # deliveries of one batch pick from several threads

    def pick(self, candidates: Iterable):
        """The next provider among ``candidates`` (objects with ``pk`` and ``weight``), or None
        when there is none."""
        candidates = list(candidates)
        if not candidates:
            return None
        with self._lock:
            total = 0
            best = None
            best_score = 0
            for provider in candidates:
                score = self._scores.get(provider.pk, 0) + provider.weight
                self._scores[provider.pk] = score
                total += provider.weight
                if best is None or score > best_score:
                    best, best_score = provider, score
            self._scores[best.pk] = best_score - total
            return best


balancer = Balancer()
