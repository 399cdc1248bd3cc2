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

One pure state machine (the ``Circuit`` value and the ``*_step`` functions: old circuit, event,
config, now -> new circuit and result) serves both stores: ``MemoryBreakerStore`` (one lock, the
embedded mode) and ``RedisBreakerStore`` (``breaker_redis.py``, an optimistic WATCH/MULTI
transaction per change). ``Breakers`` first applies an event to a plain read and writes only when
the circuit changed, so an acquire in CLOSED (per delivery) is one GET.

Accepted races (written down, not fixed): processes' clocks are assumed close (a trial's expiry
and the window's seconds are compared across processes); if Redis loses the key the breaker starts
again closed at generation 0, and a permit of the lost generation 0 would count; under heavy
contention on one provider a change retries ``REDIS_TRANSACTION_RETRIES`` times, then raises
``BreakerUnavailable`` like a down Redis (the caller permits and warns).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import TypeVar

from django.conf import settings

R = TypeVar("R")


class BreakerUnavailable(Exception):
    """The breaker's store cannot be reached (or stays contended); the caller decides, and the
    delivery service permits the call and logs a warning."""


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


@dataclass(frozen=True)
class BreakerConfig:
    """One provider's thresholds; rates are percentages."""

    failure_rate: float = 5
    slow_rate: float = 50
    slow_call_ms: float = 500
    window_s: int = 60
    minimum_calls: int = 20
    open_s: float = 30
    open_max_s: float = 0  # 0 (or <= open_s): the open duration never grows
    half_open_calls: int = 10
    half_open_success: float = 80
    permit_timeout_s: float = 2.0

    @classmethod
    def for_channel(cls, channel) -> BreakerConfig:
        """The config of every provider of ``channel`` (its ``breaker_*`` fields). A trial permit
        times out at twice the call timeout plus a second: a call the caller aborts at its
        timeout has been recorded long before."""
        return cls(
            failure_rate=channel.breaker_failure_rate,
            slow_rate=channel.breaker_slow_rate,
            slow_call_ms=channel.breaker_slow_call_ms,
            window_s=channel.breaker_window_s,
            minimum_calls=channel.breaker_minimum_calls,
            open_s=channel.breaker_open_s,
            open_max_s=channel.breaker_open_max_s,
            half_open_calls=channel.breaker_half_open_calls,
            half_open_success=channel.breaker_half_open_success,
            permit_timeout_s=2 * channel.breaker_call_timeout_ms / 1000 + 1,
        )


@dataclass(frozen=True)
class Snapshot:
    """What a breaker looks like now. In CLOSED the counts are the live window's; in the other
    states they are those of the window when the breaker left CLOSED (what opened it)."""

    state: State
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float  # percent, 0 when no calls
    slow_rate: float  # percent, 0 when no calls
    opened_at: float | None  # epoch s
    open_until: float | None  # epoch s; None unless OPEN
    reopen_count: int  # consecutive re-opens (half-open -> open) since the last close
    # The current half-open round, or the latest one (what closed or re-opened the breaker).
    trials_issued: int
    trials_done: int
    trial_successes: int


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


# --- the state machine -------------------------------------------------------------------------

Bucket = tuple[int, int, int, int]  # (epoch second, calls, failures, slow calls)


@dataclass(frozen=True)
class Circuit:
    """Everything stored for one provider's breaker: a plain value the ``*_step`` functions map
    to a new one, which a store writes only if it differs."""

    state: State = State.CLOSED
    gen: int = 0
    buckets: tuple[Bucket, ...] = ()  # ascending seconds
    left_window: tuple[int, int, int] = (0, 0, 0)  # (calls, failures, slow) when CLOSED was left
    opened_at: float | None = None
    open_until: float | None = None
    reopen_count: int = 0
    trials: tuple[tuple[int, float], ...] = ()  # outstanding trial permits: (serial, issued at)
    trials_issued: int = 0
    trials_done: int = 0
    trial_successes: int = 0
    trials_lost: int = 0  # trials counted as failed because their permit timed out


@dataclass(frozen=True)
class Change:
    from_state: State
    to_state: State
    at: float
    reason: str


Steps = list[Change]


def encode(circuit: Circuit) -> str:
    return json.dumps(asdict(circuit), separators=(",", ":"))


def decode(raw: str | bytes | None) -> Circuit:
    """The stored circuit; a fresh closed one when nothing is stored yet."""
    if raw is None:
        return Circuit()
    d = json.loads(raw)
    return Circuit(
        **{
            **d,
            "state": State(d["state"]),
            "buckets": tuple(tuple(b) for b in d["buckets"]),
            "left_window": tuple(d["left_window"]),
            "trials": tuple(tuple(t) for t in d["trials"]),
        }
    )


def _pct(part: int, whole: int) -> float:
    return 100 * part / whole if whole else 0.0


def _num(x: float) -> str:
    return f"{round(x, 1):g}"


def _window(c: Circuit, config: BreakerConfig, now: float) -> tuple[int, int, int]:
    """(calls, failures, slow) over the last ``window_s`` whole seconds, this one included."""
    oldest = math.floor(now) - config.window_s
    calls = failures = slow = 0
    for sec, n, f, s in c.buckets:
        if sec > oldest:
            calls, failures, slow = calls + n, failures + f, slow + s
    return calls, failures, slow


def _add(c: Circuit, config: BreakerConfig, now: float, failed: bool, slow: bool) -> Circuit:
    sec = math.floor(now)
    oldest = sec - config.window_s
    kept = [b for b in c.buckets if b[0] > oldest]
    for i, (s, n, f, sl) in enumerate(kept):
        if s == sec:
            kept[i] = (s, n + 1, f + failed, sl + slow)
            break
    else:  # another process's clock may be a little behind: keep the seconds sorted
        kept.append((sec, 1, int(failed), int(slow)))
        kept.sort()
    return replace(c, buckets=tuple(kept))


def _enter(c: Circuit, state: State, **changes) -> Circuit:
    """A new generation in ``state``; permits of the old one are void."""
    return replace(c, state=state, gen=c.gen + 1, trials=(), **changes)


NEW_ROUND = dict(trials_issued=0, trials_done=0, trial_successes=0, trials_lost=0)


def open_duration(config: BreakerConfig, reopen_count: int) -> float:
    """Seconds the breaker stays open after ``reopen_count`` consecutive re-opens."""
    if config.open_max_s <= config.open_s:
        return config.open_s
    return min(config.open_s * 2 ** min(reopen_count, 63), config.open_max_s)


def _open(c: Circuit, config: BreakerConfig, at: float, reopen_count: int, **changes) -> Circuit:
    until = at + open_duration(config, reopen_count)
    return _enter(
        c, State.OPEN, opened_at=at, open_until=until, reopen_count=reopen_count, **changes
    )


def _closed_verdict(c: Circuit, config: BreakerConfig, now: float) -> tuple[Circuit, Steps]:
    calls, failures, slow = _window(c, config, now)
    if calls < config.minimum_calls:
        return c, []
    if failures * 100 >= config.failure_rate * calls:
        rate, limit, what = _pct(failures, calls), config.failure_rate, "failure rate"
    elif slow * 100 >= config.slow_rate * calls:
        rate, limit, what = _pct(slow, calls), config.slow_rate, "slow-call rate"
    else:
        return c, []
    reason = f"{what} {_num(rate)} % >= {_num(limit)} % over {calls} calls"
    if what == "slow-call rate":
        reason += f" (slower than {_num(config.slow_call_ms)} ms)"
    opened = _open(c, config, now, 0, buckets=(), left_window=(calls, failures, slow))
    return opened, [Change(State.CLOSED, State.OPEN, now, reason)]


def _half_open_verdict(c: Circuit, config: BreakerConfig, at: float) -> tuple[Circuit, Steps]:
    """Decide once every trial has reported (never earlier: not on the first failure)."""
    if c.trials or c.trials_done < config.half_open_calls:
        return c, []
    done, ok = c.trials_done, c.trial_successes
    share = _pct(ok, done)
    lost = f", {c.trials_lost} not recorded in time" if c.trials_lost else ""
    if ok * 100 >= config.half_open_success * done:
        reason = (
            f"{ok} of {done} trial calls succeeded{lost} "
            f"({_num(share)} % >= {_num(config.half_open_success)} %)"
        )
        closed = _enter(
            c,
            State.CLOSED,
            buckets=(),
            left_window=(0, 0, 0),
            opened_at=None,
            open_until=None,
            reopen_count=0,
        )
        return closed, [Change(State.HALF_OPEN, State.CLOSED, at, reason)]
    reopens = c.reopen_count + 1
    reason = (
        f"{ok} of {done} trial calls succeeded{lost} "
        f"({_num(share)} % < {_num(config.half_open_success)} %); "
        f"open for {_num(open_duration(config, reopens))} s"
    )
    return _open(c, config, at, reopens), [Change(State.HALF_OPEN, State.OPEN, at, reason)]


def advance(c: Circuit, config: BreakerConfig, now: float) -> tuple[Circuit, Steps]:
    """Apply what time alone decides: trial permits not recorded within ``permit_timeout_s``
    count as failed trials, each at its expiry, and may complete the half-open verdict (taken
    at the moment the last one expired, so the outcome does not depend on who looks when)."""
    if c.state is not State.HALF_OPEN:
        return c, []
    steps: Steps = []
    for serial, issued_at in sorted(c.trials, key=lambda t: t[1]):
        expiry = issued_at + config.permit_timeout_s
        if expiry > now:
            break
        c = replace(
            c,
            trials=tuple(t for t in c.trials if t[0] != serial),
            trials_done=c.trials_done + 1,
            trials_lost=c.trials_lost + 1,
        )
        c, steps = _half_open_verdict(c, config, expiry)
        if steps:
            break
    return c, steps


def acquire_step(
    c: Circuit, config: BreakerConfig, now: float
) -> tuple[Circuit, tuple[str, bool] | None, Steps]:
    """The circuit after asking for a permit, the permit's ``(token, trial)`` or None, and the
    changes on the way."""
    c, steps = advance(c, config, now)
    if c.state in (State.CLOSED, State.DISABLED):
        return c, (str(c.gen), False), steps
    if c.state is State.FORCED_OPEN:
        return c, None, steps
    if c.state is State.OPEN:
        if c.open_until is not None and now < c.open_until:
            return c, None, steps
        reason = (
            f"open for {_num(now - (c.opened_at or now))} s: "
            f"letting {config.half_open_calls} trial calls through"
        )
        c = _enter(c, State.HALF_OPEN, open_until=None, **NEW_ROUND)
        steps = [*steps, Change(State.OPEN, State.HALF_OPEN, now, reason)]
    if c.trials_issued >= config.half_open_calls:
        return c, None, steps
    serial = c.trials_issued + 1
    c = replace(c, trials=(*c.trials, (serial, now)), trials_issued=serial)
    return c, (f"{c.gen}.{serial}", True), steps


def record_step(
    c: Circuit,
    token: str,
    trial: bool,
    config: BreakerConfig,
    *,
    success: bool,
    duration_ms: float,
    now: float,
) -> tuple[Circuit, Steps]:
    """The circuit after one call's result. Ignored (unchanged but for ``advance``) when the
    permit belongs to another generation or the state records nothing."""
    c, steps = advance(c, config, now)
    gen, _, serial = token.partition(".")
    if gen != str(c.gen):
        return c, steps
    slow = duration_ms > config.slow_call_ms
    if c.state is State.CLOSED and not trial:
        c = _add(c, config, now, failed=not success, slow=slow)
        c, more = _closed_verdict(c, config, now)
        return c, steps + more
    if c.state is State.HALF_OPEN and trial and any(str(t[0]) == serial for t in c.trials):
        c = replace(
            c,
            trials=tuple(t for t in c.trials if str(t[0]) != serial),
            trials_done=c.trials_done + 1,
            trial_successes=c.trial_successes + (success and not slow),
        )
        c, more = _half_open_verdict(c, config, now)
        return c, steps + more
    return c, steps


def admin_step(
    c: Circuit, target: State, config: BreakerConfig, now: float
) -> tuple[Circuit, Steps]:
    """``reset`` (target CLOSED, from any state: an empty window), ``force_open`` or
    ``disable``. Forcing or disabling a breaker already in that state changes nothing; a reset
    of a CLOSED breaker clears its window but reports no change of state."""
    if c.state is target and target is not State.CLOSED:
        return c, []
    window = _window(c, config, now) if c.state is State.CLOSED else c.left_window
    if target is State.CLOSED:
        cleared = dict(
            buckets=(), left_window=(0, 0, 0), opened_at=None, reopen_count=0, **NEW_ROUND
        )
        new, reason = _enter(c, target, open_until=None, **cleared), "reset"
    elif target is State.FORCED_OPEN:
        new = _enter(c, target, buckets=(), left_window=window, opened_at=now, open_until=None)
        reason = "forced open"
    else:
        new = _enter(c, target, buckets=(), left_window=window, open_until=None)
        reason = "disabled"
    return new, ([] if c.state is target else [Change(c.state, target, now, reason)])


def snapshot_of(c: Circuit, config: BreakerConfig, now: float) -> Snapshot:
    calls, failures, slow = _window(c, config, now) if c.state is State.CLOSED else c.left_window
    return Snapshot(
        state=c.state,
        calls=calls,
        failures=failures,
        slow_calls=slow,
        failure_rate=_pct(failures, calls),
        slow_rate=_pct(slow, calls),
        opened_at=c.opened_at,
        open_until=c.open_until,
        reopen_count=c.reopen_count,
        trials_issued=c.trials_issued,
        trials_done=c.trials_done,
        trial_successes=c.trial_successes,
    )


# --- stores -------------------------------------------------------------------------------------


class BreakerStore:
    """Where circuits live. ``load`` is one read; ``update`` applies a pure change atomically
    (it may call ``change`` more than once) and writes only a circuit that differs. Both raise
    ``BreakerUnavailable`` when the store cannot be reached."""

    def load(self, provider_id: int) -> Circuit:
        raise NotImplementedError

    def update(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        raise NotImplementedError


class MemoryBreakerStore(BreakerStore):
    """One process holds every circuit (the embedded mode, and tests)."""

    def __init__(self) -> None:
        self._circuits: dict[int, Circuit] = {}
        self._lock = threading.Lock()  # Celery's thread pool and the embedded loop share it

    def load(self, provider_id: int) -> Circuit:
        with self._lock:
            return self._circuits.get(provider_id, Circuit())

    def update(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        with self._lock:
            old = self._circuits.get(provider_id, Circuit())
            new, result = change(old)
            if new != old:
                self._circuits[provider_id] = new
            return result


# --- the interface ------------------------------------------------------------------------------


class Breakers:
    """Every provider's breaker over one store. Each method reads the clock once; all raise
    ``BreakerUnavailable`` when the store cannot be reached."""

    def __init__(self, store: BreakerStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def _apply(self, provider_id: int, change: Callable[[Circuit], tuple[Circuit, R]]) -> R:
        # A plain read first: most events change nothing (acquire in CLOSED, refusals, ignored
        # results), and those must not pay for a transaction.
        old = self.store.load(provider_id)
        new, result = change(old)
        if new == old:
            return result
        return self.store.update(provider_id, change)

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
        self, provider_id: int, config: BreakerConfig
    ) -> tuple[Permit | None, Transition | None]:
        """A permit to call the provider once (None: refused), and the transition it caused
        (OPEN -> HALF_OPEN when the open period is over, or a verdict on timed-out trials)."""
        now = self.clock()

        def change(c: Circuit):
            new, grant, steps = acquire_step(c, config, now)
            return new, (new, grant, steps)

        c, grant, steps = self._apply(provider_id, change)
        permit = Permit(provider_id, grant[0], grant[1]) if grant else None
        return permit, self._transition(provider_id, c, steps, config, now)

    def record(
        self, permit: Permit, config: BreakerConfig, *, success: bool, duration_ms: float
    ) -> Transition | None:
        """Report the result of the call ``permit`` allowed; a call aborted at its timeout is a
        failure. Returns the transition it caused, if any."""
        now = self.clock()

        def change(c: Circuit):
            new, steps = record_step(
                c,
                permit.token,
                permit.trial,
                config,
                success=success,
                duration_ms=duration_ms,
                now=now,
            )
            return new, (new, steps)

        c, steps = self._apply(permit.provider_id, change)
        return self._transition(permit.provider_id, c, steps, config, now)

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

    def permits(self, provider_id: int, config: BreakerConfig) -> bool:
        """Whether ``acquire`` would permit now, for the balancer's choice; takes no trial and
        writes nothing (True in OPEN once the open period is over)."""
        _, grant, _ = acquire_step(self.store.load(provider_id), config, self.clock())
        return grant is not None


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
