"""Breaker circuits shared by every process through Redis: the production store of
``breaker.py`` (its module docstring describes the semantics and the accepted races).

One JSON string per provider, ``{prefix}:breaker:{provider_id}``, without a TTL (an idle provider's
breaker must not forget that it is forced open). A change is the same pure function the memory
store runs, inside an optimistic transaction: WATCH the key, GET, compute, MULTI/SET/EXEC, and
again if another process wrote in between. Chosen over a Lua script so that the state machine
exists once, in Python; a read that changes nothing (most acquires) never gets here.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from .breaker import BreakerStore, BreakerUnavailable, R
from .breaker_circuit import Circuit, decode, encode

# A change conflicts only with another write to the same provider in the ~1 ms between its WATCH
# and EXEC; 50 losses in a row means the store is effectively unusable for this provider.
REDIS_TRANSACTION_RETRIES = 50


class RedisBreakerStore(BreakerStore):
    """Circuits in Redis, keyed ``{prefix}:breaker:{provider_id}``. ``client`` is a synchronous
    ``redis.Redis`` (thread-safe: each transaction takes its own pooled connection)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, provider_id: int) -> str:
        return f"{self.prefix}:breaker:{provider_id}"

    def load(self, provider_id: int) -> Circuit:
        try:
            return decode(self.client.get(self.key(provider_id)))
        except (redis.RedisError, OSError) as exc:
            raise BreakerUnavailable(f"redis: {exc}") from exc

    def update(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        key = self.key(provider_id)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in range(REDIS_TRANSACTION_RETRIES):
                    try:
                        pipe.watch(key)
                        old = decode(pipe.get(key))
                        new, result = change(old)
                        if new == old:
                            pipe.unwatch()
                            return result
                        pipe.multi()
                        pipe.set(key, encode(new))
                        pipe.execute()
                        return result
                    except redis.WatchError:
                        continue  # another process changed it first: compute again on its state
        except (redis.RedisError, OSError) as exc:
            raise BreakerUnavailable(f"redis: {exc}") from exc
        raise BreakerUnavailable(
            f"redis: breaker {key} still contended after {REDIS_TRANSACTION_RETRIES} tries"
        )
