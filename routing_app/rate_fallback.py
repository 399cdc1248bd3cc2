"""The ingest rate limit while its shared store (Redis) is away: each process counts its share.

Postgres, not Redis, is the truth of ingest, so an unreachable rate limiter must not refuse every
post. While the store does not answer, each process admits at most its share of a key's rate,
the rate divided by ``settings.INGEST_SERVER_PROCESSES``, counted in its own memory with the
``limits`` library's fixed window (as the shared counter is: apikeys.take), so the deployment as a
whole stays near the key's rate.

- One warning when the outage starts and one when the store answers again, never one per
  request; the gauge ``notify_limiter_fallback`` is 1 in a process meanwhile and
  ``notify_limiter_fallback_requests_total`` counts the requests it counted alone.
- While the fallback is on, the store is tried again at most every ``PROBE_EVERY_S`` (by one
  request; the others do not wait on a dead store's timeouts).

Accepted inexactness: a window counted partly by the store and partly here may admit up to a
share more than the rate; processes fewer than ``INGEST_SERVER_PROCESSES`` admit less than the
rate, more of them admit more.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from django.conf import settings
from limits import RateLimitItem
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from .delivery.limiter import rate_item
from .metrics.instruments import LIMITER_FALLBACK, LIMITER_FALLBACK_REQUESTS

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # how soon after a failure the shared store is tried again


class RateFallback:
    """This process's count of each key's share while the shared store is away (thread-safe)."""

    def __init__(self) -> None:
        self._strategy = FixedWindowRateLimiter(MemoryStorage())
        self._items: dict[str, RateLimitItem] = {}
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the outage's first failure
        self._next_probe = 0.0

    @property
    def active(self) -> bool:
        return self._since is not None

    def should_probe(self) -> bool:
        """Whether this request should try the shared store: always while it works, once per
        PROBE_EVERY_S while the fallback is on."""
        if self._since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._next_probe:
                return False
            self._next_probe = now + PROBE_EVERY_S
            return True

    def store_failed(self, error: Exception) -> None:
        """The shared store did not answer: turn the fallback on (one warning per outage)."""
        with self._lock:
            self._next_probe = time.monotonic() + PROBE_EVERY_S
            if self._since is not None:
                return
            self._since = time.monotonic()
        LIMITER_FALLBACK.set(1)
        if settings.RATELIMIT_FAIL_OPEN:
            admits = "every ingest request (RATELIMIT_FAIL_OPEN)"
        else:
            admits = (
                f"1/{settings.INGEST_SERVER_PROCESSES} of each API key's ingest rate on its own "
                "(INGEST_SERVER_PROCESSES)"
            )
        log.warning(
            "the rate limiter's store does not answer (%s): until it does, this process admits %s",
            error,
            admits,
        )

    def store_answered(self) -> None:
        """The shared store answered: turn the fallback off (one warning, if it was on)."""
        if self._since is None:  # the usual case, on every request: no lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is None:
            return
        LIMITER_FALLBACK.set(0)
        log.warning(
            "the rate limiter's store answers again after %.1f s: API key rates are shared again",
            time.monotonic() - since,
        )

    def take(self, prefix: str, rate: str, requests: int) -> tuple[int, int]:
        """Count ``requests`` of key ``prefix`` against this process's share of ``rate``; return
        (how many fit, the first ones; seconds until the window ends), as apikeys.take does."""
        item = self._item(rate)
        with self._lock:
            reset_at, remaining = self._strategy.get_window_stats(item, prefix)
            fits = min(requests, remaining)
            if fits:
                self._strategy.hit(item, prefix, cost=fits)
                if reset_at <= time.time():  # a fresh window: its reset time starts now
                    reset_at = self._strategy.get_window_stats(item, prefix).reset_time
        LIMITER_FALLBACK_REQUESTS.inc(requests)
        return fits, max(1, math.ceil(reset_at - time.time()))

    def _item(self, rate: str) -> RateLimitItem:
        item = self._items.get(rate)
        if item is None:
            full = rate_item(rate)
            share = max(1, full.amount // settings.INGEST_SERVER_PROCESSES)
            item = self._items[rate] = type(full)(share, full.multiples)
        return item


fallback = RateFallback()
