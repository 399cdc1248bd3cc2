"""The limiter that waits: per channel (``Channel.rate_limit``) and per provider
(``Provider.rate_limit``), shared by every worker process.

Built on the ``limits`` library's sliding-window counter (Redis storage with ``REDIS_URL``, memory
in the embedded mode). Celery's own ``rate_limit`` is per worker process, so N workers would send
N times the limit: it does not fit. Over the limit, ``wait_s`` says how long until the window has
room; the delivery service reschedules the row for then, so nothing is dropped and no try is
counted. Accepted race: a hit is taken before the call, so a call that then fails still used
its slot.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerSecond,
)
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import SlidingWindowCounterRateLimiter

from ..models import RATE_RE

_PER = {
    "s": RateLimitItemPerSecond,
    "m": RateLimitItemPerMinute,
    "h": RateLimitItemPerHour,
    "d": RateLimitItemPerDay,
}
MIN_WAIT_S = 0.01  # a wait of "now" would spin: the window frees a slot a little later


def rate_item(rate: str) -> RateLimitItem:
    """``100/s``, ``600/m``, ``5/10s`` (our rate syntax, as django-ratelimit's) as a ``limits``
    item. ValueError names the bad rate."""
    match = RATE_RE.match(rate or "")
    if not match:
        raise ValueError(f"rate {rate!r} is not valid: write count/period, e.g. '100/s'")
    count, multiple, unit = match.groups()
    return _PER[unit](int(count), int(multiple or 1))


class Limiter:
    """``wait_s(key, rate)``: 0 when a call may go now (and takes its slot), else the seconds
    until the window has room (nothing taken)."""

    def __init__(self, storage: Storage) -> None:
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        self._items: dict[str, RateLimitItem] = {}

    def _item(self, rate: str) -> RateLimitItem:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = rate_item(rate)
        return item

    def wait_s(self, key: str, rate: str) -> float:
        if not rate:
            return 0.0
        item = self._item(rate)
        if self._strategy.hit(item, key):
            return 0.0
        return self._wait(item, key)

    def take(self, key: str, rate: str, cost: int) -> bool:
        """Take ``cost`` slots at once if the window has room for all of them (True), else take
        none (False). One round trip whatever the cost."""
        return not rate or self._strategy.hit(self._item(rate), key, cost=cost)

    def _wait(self, item: RateLimitItem, key: str) -> float:
        reset_at = self._strategy.get_window_stats(item, key).reset_time
        return max(MIN_WAIT_S, min(reset_at - time.time(), item.get_expiry()))

    def reset(self) -> None:
        self._strategy.storage.reset()

    def call_wait_s(self, channel, provider) -> float:
        """The wait before ``provider`` of ``channel`` may be called: 0 = go (both limits
        took a slot). When only the provider is full, the channel's slot stays taken: it
        is a short-lived over-count, never a lost delivery."""
        wait = self.wait_s(f"channel:{channel.pk}", channel.rate_limit)
        if wait:
            return wait
        return self.wait_s(f"provider:{provider.pk}", provider.rate_limit)

    def call_waits(self, calls: list[tuple]) -> list[float]:
        """``call_wait_s`` of each ``(channel, provider)`` of a batch, in one round trip per
        channel and per provider when their windows have room for the whole batch's share: the
        same slots taken as one ``call_wait_s`` after another. A window that cannot take its
        whole share is asked row by row, in order, as ``call_wait_s`` would be (some rows go,
        the rest wait)."""
        waits = [0.0] * len(calls)
        for index, key, rate in self._groups(calls, channel=True):
            self._share(waits, index, key, rate)
        going = [i for i, wait in enumerate(waits) if not wait]
        for index, key, rate in self._groups([calls[i] for i in going], channel=False):
            self._share(waits, [going[i] for i in index], key, rate)
        return waits

    @staticmethod
    def _groups(calls: list[tuple], *, channel: bool):
        groups: dict[str, tuple[list[int], str]] = {}
        for i, (ch, provider) in enumerate(calls):
            owner, name = (ch, "channel") if channel else (provider, "provider")
            if owner.rate_limit:
                groups.setdefault(f"{name}:{owner.pk}", ([], owner.rate_limit))[0].append(i)
        return [(index, key, rate) for key, (index, rate) in groups.items()]

    def _share(self, waits: list[float], index: list[int], key: str, rate: str) -> None:
        if self.take(key, rate, len(index)):
            return
        for i in index:
            waits[i] = self.wait_s(key, rate)


_limiter: Limiter | None = None
_lock = threading.Lock()


def limiter() -> Limiter:
    """The process's limiter: Redis-backed (shared by all processes) with ``REDIS_URL``, else in
    memory (the embedded mode has one process)."""
    global _limiter
    if _limiter is None:
        with _lock:
            if _limiter is None:
                if settings.REDIS_URL:
                    storage = RedisStorage(
                        settings.REDIS_URL,
                        key_prefix=f"{settings.REDIS_PREFIX}:limits",
                        socket_timeout=2,
                        socket_connect_timeout=2,
                    )
                else:
                    storage = MemoryStorage()
                _limiter = Limiter(storage)
    return _limiter
