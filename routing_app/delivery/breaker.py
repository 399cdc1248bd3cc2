"""The circuit breaker of each provider, with Resilience4j's CircuitBreaker semantics
(https://resilience4j.readme.io/docs/circuitbreaker).

Our own code because the Python breaker libraries (pybreaker, circuitbreaker, aiobreaker) count
consecutive failures only: none has a failure *rate* over a time-based sliding window, a slow-call
rate, a minimum number of calls before deciding, or a half-open state that lets exactly N trial
calls through and decides on all of them.

States and what moves them:

- CLOSED: every result goes into a time-based sliding window of ``window_s`` one-second buckets.
  After each result, once the window holds ``minimum_calls`` calls, a failure rate >=
  ``failure_rate`` % or a slow-call rate (slower than ``slow_call_ms``, success or not) >=
  ``slow_rate`` % opens the breaker.
- OPEN: refuses for ``open_s`` seconds; each consecutive re-open (half-open -> open) doubles that,
  up to ``open_max_s`` when it is larger than ``open_s``; a close starts again from ``open_s``.
  The first acquire after that moves to HALF_OPEN (Resilience4j's automatic transition).
- HALF_OPEN: exactly ``half_open_calls`` trial permits, then refusals until every trial has
  reported; then closed (window cleared) if the share of successful trials is >=
  ``half_open_success`` %, else open again. A trial succeeds when it succeeded and was not slow
  (Resilience4j also re-opens on the slow-call rate of the trials). A trial permit not recorded
  within ``permit_timeout_s`` (its worker died) counts as a failed trial, at the moment it
  expired, whoever looks next.
- FORCED_OPEN: refuses until ``reset``. DISABLED: permits everything and records nothing until
  ``reset``.

Every state change starts a new *generation*; a permit carries its generation in its token, so a
result of a call permitted before the change (a closed-state call that ends after the breaker
went half-open, a trial that ends after its permit timed out) is ignored.

One pure state machine (``breaker_circuit.py``: a ``Circuit`` value and functions of old circuit,
event, config and time to a new circuit and a result) serves both stores: ``MemoryBreakerStore``
(one lock, the embedded mode) and ``RedisBreakerStore`` (``breaker_redis.py``: each change in an
optimistic WATCH/MULTI transaction, the closed-state window as counters). What a delivery costs:
an acquire in CLOSED is one read (``Breakers`` applies an event to a plain read first and writes
only when the circuit changed); a result in CLOSED is one atomic count that reads the window back;
transactions only for transitions, trials and admin actions.

Accepted races (written down, not fixed): processes' clocks are assumed close (a trial's expiry
and the window's seconds are compared across processes); if Redis loses its keys the breaker
starts again closed at generation 0, and a permit of the lost generation 0 would count; a change
that keeps losing the optimistic race (``REDIS_TRANSACTION_RETRIES`` times) raises
``BreakerUnavailable`` like a down Redis, and the caller permits and warns.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from django.conf import settings

from .breaker_circuit import (
    BreakerConfig,
    Circuit,
    Snapshot,
    State,
    Steps,
    acquire_step,
    admin_step,
    advance,
    closed_verdict,
    count_call,
    generation,
    snapshot_of,
    trial_step,
    window_counts,
)

__all__ = [
    "BreakerConfig",
    "BreakerStore",
    "BreakerUnavailable",
    "Breakers",
    "MemoryBreakerStore",
    "Permit",
    "Reads",
    "Snapshot",
    "State",
    "Transition",
    "breakers_from_settings",
    "reset_breakers_for_tests",
]

R = TypeVar("R")


class BreakerUnavailable(Exception):
    """The breaker's store cannot be reached (or stays contended); the caller decides, and the
    delivery service permits the call and logs a warning."""


@dataclass(frozen=True)
class Permit:
    """Leave to call a provider once; hand it back to ``Breakers.record``."""

    provider_id: int
    token: str  # "<generation>" or, for a trial, "<generation>.<serial>"
    trial: bool


@dataclass(frozen=True)
class Transition:
    """A change of state, for the log and the admin mirror (``BreakerState``). When one call
    causes several (a stale trial re-opens, and that open period is already over), they come as
    one: the first ``from_state``, the last ``to_state``, the reasons joined."""

    provider_id: int
    from_state: State
    to_state: State
    at: float  # epoch s
    reason: str
    snapshot: Snapshot  # after the change


# --- stores -------------------------------------------------------------------------------------


class BreakerStore:
    """Where circuits live. All methods raise ``BreakerUnavailable`` when the store cannot be
    reached."""

    def load(self, provider_id: int, *, window: bool = True) -> Circuit:
        """The circuit, in one read when ``window`` is False (its buckets may then be empty)."""
        raise NotImplementedError

    def update(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        """Apply the pure ``change`` atomically (it may run more than once) and write the new
        circuit only if it differs; return the result of the run that counted. ``change`` must
        not add to the window (``add_call`` does that)."""
        raise NotImplementedError

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
        """``count_call`` atomically, without optimistic retries (the hot path: one per
        delivery); return the circuit right after it, window included."""
        raise NotImplementedError

    def add_calls(
        self,
        provider_id: int,
        gen: int,
        config: BreakerConfig,
        now: float,
        results: list[tuple[bool, bool]],
    ) -> Circuit:
        """``add_call`` of each ``(failed, slow)`` in ``results`` at once; the circuit right
        after the last one, window included."""
        circuit = Circuit()
        for failed, slow in results:
            circuit = self.add_call(provider_id, gen, config, now, failed=failed, slow=slow)
        return circuit


class MemoryBreakerStore(BreakerStore):
    """One process holds every circuit (the embedded mode, and tests)."""

    def __init__(self) -> None:
        self._circuits: dict[int, Circuit] = {}
        self._lock = threading.Lock()  # Celery's thread pool and the embedded loop share it

    def load(self, provider_id: int, *, window: bool = True) -> Circuit:
        with self._lock:
            return self._circuits.get(provider_id, Circuit())

    def update(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        with self._lock:
            old = self._circuits.get(provider_id, Circuit())
            new, result = change(old)
            if new != old:
                self._circuits[provider_id] = new
            return result

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
        with self._lock:
            old = self._circuits.get(provider_id, Circuit())
            new = count_call(old, gen, config, now, failed=failed, slow=slow)
            if new is not old:
                self._circuits[provider_id] = new
            return new

    def add_calls(
        self,
        provider_id: int,
        gen: int,
        config: BreakerConfig,
        now: float,
        results: list[tuple[bool, bool]],
    ) -> Circuit:
        with self._lock:  # the batch at once, as the Redis store's one MULTI
            old = circuit = self._circuits.get(provider_id, Circuit())
            for failed, slow in results:
                circuit = count_call(circuit, gen, config, now, failed=failed, slow=slow)
            if circuit is not old:
                self._circuits[provider_id] = circuit
            return circuit


# --- the interface ------------------------------------------------------------------------------

# Circuits read once for a batch of deliveries (provider id -> circuit without its window), so the
# batch's choices and acquires cost one read per provider instead of two per delivery. Sound
# because every change goes through the store's own atomic ``update`` on a fresh read, and the
# entry of a provider is dropped as soon as this process writes it: a reused read only lets the
# batch's calls go out as if they had all been permitted at the moment of that read (calls
# permitted before another process's change, which the generation in their permits then
# ignores). Use one for the few milliseconds of a batch's choices, never longer.
Reads = dict[int, Circuit]


class Breakers:
    """Every provider's breaker over one store. Each method reads the clock once; all raise
    ``BreakerUnavailable`` when the store cannot be reached."""

    def __init__(self, store: BreakerStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def _apply(
        self,
        provider_id: int,
        change: Callable[[Circuit], tuple[Circuit, R]],
        reads: Reads | None = None,
    ) -> R:
        # A plain read first: most events change nothing (acquire in CLOSED, refusals, ignored
        # results), and those must not pay for a transaction.
        old = self._read(provider_id, reads)
        new, result = change(old)
        if new == old:
            return result
        if reads is not None:
            reads.pop(provider_id, None)  # written: the next look reads the store again
        return self.store.update(provider_id, change)

    def _read(self, provider_id: int, reads: Reads | None) -> Circuit:
        if reads is None:
            return self.store.load(provider_id, window=False)
        circuit = reads.get(provider_id)
        if circuit is None:
            circuit = reads[provider_id] = self.store.load(provider_id, window=False)
        return circuit

    def _transition(
        self, provider_id: int, c: Circuit, steps: Steps, config: BreakerConfig, now: float
    ) -> Transition | None:
        if not steps:
            return None
        return Transition(
            provider_id=provider_id,
            from_state=steps[0].from_state,
            to_state=steps[-1].to_state,
            at=steps[-1].at,
            reason="; then ".join(s.reason for s in steps),
            snapshot=snapshot_of(c, config, now),
        )

    def acquire(
        self, provider_id: int, config: BreakerConfig, *, reads: Reads | None = None
    ) -> tuple[Permit | None, Transition | None]:
        """A permit to call the provider once (None: refused), and the transition it caused
        (OPEN -> HALF_OPEN when the open period is over, or a verdict on timed-out trials).
        With ``reads`` (see ``Reads``) an acquire that changes nothing reads no store."""
        now = self.clock()

        def change(c: Circuit):
            new, grant, steps = acquire_step(c, config, now)
            return new, (new, grant, steps)

        c, grant, steps = self._apply(provider_id, change, reads)
        permit = Permit(provider_id, grant[0], grant[1]) if grant else None
        return permit, self._transition(provider_id, c, steps, config, now)

    def record(
        self, permit: Permit, config: BreakerConfig, *, success: bool, duration_ms: float
    ) -> Transition | None:
        """Report the result of the call ``permit`` allowed; a call aborted at its timeout is a
        failure. Returns the transition it caused, if any. A non-trial result is one atomic
        count in the store (no transaction: one per delivery); only when it trips the
        thresholds does a transaction follow, which opens the breaker if it still holds."""
        now = self.clock()
        slow = duration_ms > config.slow_call_ms
        pid = permit.provider_id
        if permit.trial:

            def trial(c: Circuit):
                new, steps = trial_step(
                    c, permit.token, config, success=success, slow=slow, now=now
                )
                return new, (new, steps)

            c, steps = self._apply(pid, trial)
            return self._transition(pid, c, steps, config, now)
        gen = generation(permit.token)
        counted = self.store.add_call(pid, gen, config, now, failed=not success, slow=slow)
        if not closed_verdict(counted, gen, config, now)[1]:
            return None

        def verdict(c: Circuit):
            new, steps = closed_verdict(c, gen, config, now)
            return new, (new, steps)

        c, steps = self.store.update(pid, verdict)
        return self._transition(pid, c, steps, config, now)

    def record_batch(
        self, results: list[tuple[Permit, bool, float]], config: BreakerConfig
    ) -> list[Transition]:
        """``record`` of each ``(permit, success, duration_ms)`` in turn, in one count in the
        store per provider and generation for the non-trial results (trial results go one by
        one, as ``record``). The decision is the one ``record`` after each result would take:
        the window is checked as it stood after each of the batch's results, in order, and
        the first that reaches a threshold opens the breaker (if it still holds in the store's
        transaction); results after it would have been ignored then, and counted in a window
        that the new generation leaves behind now. Returns the transitions caused."""
        now = self.clock()
        transitions = []
        groups: dict[tuple[int, int], list[tuple[bool, bool]]] = {}
        for permit, success, duration_ms in results:
            if permit.trial:
                t = self.record(permit, config, success=success, duration_ms=duration_ms)
                transitions += [t] if t else []
                continue
            key = (permit.provider_id, generation(permit.token))
            groups.setdefault(key, []).append((not success, duration_ms > config.slow_call_ms))
        for (pid, gen), outcomes in groups.items():
            counted = self.store.add_calls(pid, gen, config, now, outcomes)
            tripped = _first_trip(counted, gen, config, now, outcomes)
            if tripped is None:
                continue
            later = outcomes[tripped + 1 :]

            def verdict(c: Circuit, later=later, gen=gen):
                new, steps = closed_verdict(_before(c, config, now, later), gen, config, now)
                return (new, (new, steps)) if steps else (c, (c, steps))

            c, steps = self.store.update(pid, verdict)
            t = self._transition(pid, c, steps, config, now)
            transitions += [t] if t else []
        return transitions

    def _admin(
        self, provider_id: int, target: State, config: BreakerConfig | None
    ) -> Transition | None:
        config = config or BreakerConfig()  # only its window_s matters: the counts kept
        now = self.clock()

        def change(c: Circuit):
            new, steps = admin_step(c, target, config, now)
            return new, (new, steps)

        c, steps = self.store.update(provider_id, change)
        return self._transition(provider_id, c, steps, config, now)

    def reset(self, provider_id: int, config: BreakerConfig | None = None) -> Transition | None:
        """CLOSED with an empty window, from any state (the only way out of FORCED_OPEN and
        DISABLED). None when it already was CLOSED (the window is cleared all the same)."""
        return self._admin(provider_id, State.CLOSED, config)

    def force_open(
        self, provider_id: int, config: BreakerConfig | None = None
    ) -> Transition | None:
        """FORCED_OPEN: every acquire refused until ``reset``. None if it already was."""
        return self._admin(provider_id, State.FORCED_OPEN, config)

    def disable(self, provider_id: int, config: BreakerConfig | None = None) -> Transition | None:
        """DISABLED: every acquire permitted, nothing recorded, until ``reset``. None if it
        already was."""
        return self._admin(provider_id, State.DISABLED, config)

    def snapshot(self, provider_id: int, config: BreakerConfig) -> Snapshot:
        """The breaker as the next call would find it (timed-out trials counted); writes
        nothing."""
        now = self.clock()
        c, _ = advance(self.store.load(provider_id), config, now)
        return snapshot_of(c, config, now)

    def passes_all(self, provider_id: int, *, reads: Reads | None = None) -> bool:
        """Whether the breaker lets every call through without a write (CLOSED or DISABLED):
        acquires then change nothing. False when its store cannot be reached."""
        try:
            state = self._read(provider_id, reads).state
        except BreakerUnavailable:
            return False
        return state in (State.CLOSED, State.DISABLED)

    def permits(
        self, provider_id: int, config: BreakerConfig, *, reads: Reads | None = None
    ) -> bool:
        """Whether ``acquire`` would permit now, for the balancer's choice; takes no trial and
        writes nothing (True in OPEN once the open period is over)."""
        circuit = self._read(provider_id, reads)
        _, grant, _ = acquire_step(circuit, config, self.clock())
        return grant is not None


def _before(
    c: Circuit, config: BreakerConfig, now: float, later: list[tuple[bool, bool]]
) -> Circuit:
    """``c`` as its window stood before the results ``later`` were counted: the window's totals
    as one bucket of this second (all that a closed verdict reads)."""
    calls, failures, slow = window_counts(c, config, now)
    calls -= len(later)
    failures -= sum(failed for failed, _ in later)
    slow -= sum(s for _, s in later)
    return replace(c, buckets=((math.floor(now), calls, failures, slow),))


def _first_trip(
    counted: Circuit, gen: int, config: BreakerConfig, now: float, outcomes: list
) -> int | None:
    """The index of the first of ``outcomes`` (all counted in ``counted``) after which the
    closed verdict opens the breaker; None when none does."""
    if counted.state is not State.CLOSED or counted.gen != gen:
        return None
    for i in range(len(outcomes)):
        if closed_verdict(_before(counted, config, now, outcomes[i + 1 :]), gen, config, now)[1]:
            return i
    return None


_breakers: Breakers | None = None
_breakers_lock = threading.Lock()


def breakers_from_settings() -> Breakers:
    """The process's breakers: in Redis (keys ``{REDIS_PREFIX}:breaker:{provider_id}``) when
    ``settings.REDIS_URL`` is set, in memory otherwise."""
    global _breakers
    if _breakers is None:
        with _breakers_lock:
            if _breakers is None:
                if settings.REDIS_URL:
                    from routing_app.pubsub import sync_redis

                    from .breaker_redis import RedisBreakerStore  # it imports this module

                    store: BreakerStore = RedisBreakerStore(sync_redis(), settings.REDIS_PREFIX)
                else:
                    store = MemoryBreakerStore()
                _breakers = Breakers(store)
    return _breakers


def reset_breakers_for_tests() -> None:
    """Forget the process's breakers; the next ``breakers_from_settings`` reads settings anew."""
    global _breakers
    with _breakers_lock:
        _breakers = None
