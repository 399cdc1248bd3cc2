"""Breaker circuits shared by every process through Redis: the production store of
``breaker.py`` (its module docstring describes the semantics and the accepted races).

Two keys per provider:

- ``{prefix}:breaker:{provider_id}``: the circuit as one JSON string without its window, no TTL
  (an idle provider's breaker must not forget that it is forced open). Every change is the pure
  function the memory store runs, inside an optimistic transaction: WATCH the key, GET, compute,
  MULTI/SET/EXEC, and again if another process wrote in between.
- ``{prefix}:breaker:{provider_id}:window:{generation}``: the closed-state window of one
  generation, a hash of counters per second (``c:<s>`` calls, ``f:<s>`` failures, ``w:<s>`` slow
  calls), bumped with HINCRBY in one MULTI that also reads the window and the circuit back. Its
  TTL is the window's length: an idle window expires exactly when every second in it has left
  the window, and the window of a past generation soon after.

Why the window is not in the JSON: a result per delivery through WATCH/MULTI collapsed under
contention. Measured on this machine (2 cores, local Redis), 4 processes each acquiring and
recording for one provider: with the window in the JSON one of them lost the optimistic race 50
times in a row and failed (~950 results/s before that); with the counters 8 processes record
~4,800 results/s, every one counted, no retries. The decisions stay in Python
(``breaker_circuit.py``); Redis only adds numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import redis

from .breaker import BreakerStore, BreakerUnavailable, R
from .breaker_circuit import BreakerConfig, Bucket, Circuit, decode, encode

# A change conflicts only with another change of the same provider (a trial, a transition, an
# admin action: rare) in the ~1 ms between its WATCH and EXEC.
REDIS_TRANSACTION_RETRIES = 50

_KINDS = ("c", "f", "w")  # calls, failures, slow calls: the order of a Bucket's counts


def _buckets(fields: dict[bytes, bytes], oldest: float) -> tuple[tuple[Bucket, ...], list[bytes]]:
    """The window's buckets (seconds after ``oldest``), and the fields of older seconds."""
    per_second: dict[int, list[int]] = {}
    stale = []
    for name, value in fields.items():
        kind, _, sec = name.decode().partition(":")
        if int(sec) <= oldest:
            stale.append(name)
            continue
        per_second.setdefault(int(sec), [0, 0, 0])[_KINDS.index(kind)] = int(value)
    buckets = tuple((sec, *counts) for sec, counts in sorted(per_second.items()))
    return buckets, stale


class RedisBreakerStore(BreakerStore):
    """Circuits in Redis (see the module docstring for the keys). ``client`` is a synchronous
    ``redis.Redis``; it is thread-safe, each command or transaction takes a pooled connection."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, provider_id: int) -> str:
        return f"{self.prefix}:breaker:{provider_id}"

    def window_key(self, provider_id: int, gen: int) -> str:
        return f"{self.prefix}:breaker:{provider_id}:window:{gen}"

    def _with_window(self, client, provider_id: int, circuit: Circuit) -> Circuit:
        fields = client.hgetall(self.window_key(provider_id, circuit.gen))
        # Buckets of any age: whoever reads them filters by its config's window.
        return replace(circuit, buckets=_buckets(fields, -math.inf)[0])

    def load(self, provider_id: int, *, window: bool = True) -> Circuit:
        try:
            circuit = decode(self.client.get(self.key(provider_id)))
            return self._with_window(self.client, provider_id, circuit) if window else circuit
        except (redis.RedisError, OSError) as exc:
            raise BreakerUnavailable(f"redis: {exc}") from exc

    def update(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        key = self.key(provider_id)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in range(REDIS_TRANSACTION_RETRIES):
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        old = self._with_window(pipe, provider_id, decode(raw))
                        new, result = change(old)
                        # A change empties the window only by starting a new generation, whose
                        # window key is fresh: the buckets need no writing.
                        encoded = encode(new, buckets=False)
                        if new == old or (raw is not None and encoded == raw.decode()):
                            pipe.unwatch()
                            return result
                        pipe.multi()
                        pipe.set(key, encoded)
                        pipe.execute()
                        return result
                    except redis.WatchError:
                        continue  # another process changed it first: compute again on its state
        except (redis.RedisError, OSError) as exc:
            raise BreakerUnavailable(f"redis: {exc}") from exc
        raise BreakerUnavailable(
            f"redis: breaker {key} still contended after {REDIS_TRANSACTION_RETRIES} tries"
        )

    def add_call(
        self,
        provider_id: int,
        gen: int,
        config: BreakerConfig,
        now: float,
        *,
        failed: bool,
        slow: bool,
    ) -> Circuit:
        return self._count(provider_id, gen, config, now, 1, int(failed), int(slow))

    def add_calls(
        self,
        provider_id: int,
        gen: int,
        config: BreakerConfig,
        now: float,
        results: list[tuple[bool, bool]],
    ) -> Circuit:
        # One MULTI for the whole batch: the same counters, bumped by the batch's totals.
        failures = sum(failed for failed, _ in results)
        slow = sum(s for _, s in results)
        return self._count(provider_id, gen, config, now, len(results), failures, slow)

    def _count(
        self,
        provider_id: int,
        gen: int,
        config: BreakerConfig,
        now: float,
        calls: int,
        failures: int,
        slow: int,
    ) -> Circuit:
        # Counted into the permit's own generation, unconditionally: a past generation's window
        # is never read again, so counting there is counting nowhere, as count_call requires.
        sec = math.floor(now)
        window_key = self.window_key(provider_id, gen)
        gone = sec - config.window_s  # the second that has just left the window
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hincrby(window_key, f"c:{sec}", calls)
                if failures:
                    pipe.hincrby(window_key, f"f:{sec}", failures)
                if slow:
                    pipe.hincrby(window_key, f"w:{sec}", slow)
                pipe.hdel(window_key, *(f"{kind}:{gone}" for kind in _KINDS))
                pipe.expire(window_key, math.ceil(config.window_s) + 1)
                pipe.hgetall(window_key)
                pipe.get(self.key(provider_id))
                *_, fields, raw = pipe.execute()
            buckets, stale = _buckets(fields, gone)
            if stale:  # left by seconds in which no call ended
                self.client.hdel(window_key, *stale)
        except (redis.RedisError, OSError) as exc:
            raise BreakerUnavailable(f"redis: {exc}") from exc
        circuit = decode(raw)
        return replace(circuit, buckets=buckets) if circuit.gen == gen else circuit
