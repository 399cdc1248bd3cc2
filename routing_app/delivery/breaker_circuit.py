"""The state machine of one provider's circuit breaker, as pure functions: a ``Circuit`` (all
that is stored for one provider), an event, the config and the time in, a new ``Circuit`` and the
event's result out. ``breaker.py`` runs it inside each store's atomic operations and describes the
semantics (Resilience4j's CircuitBreaker, https://resilience4j.readme.io/docs/circuitbreaker).

Times are epoch seconds; nothing here reads a clock, so every decision can be replayed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from enum import StrEnum


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


Bucket = tuple[int, int, int, int]  # (epoch second, calls, failures, slow calls)


@dataclass(frozen=True)
class Circuit:
    """Everything stored for one provider's breaker: a plain value the functions below map to
    a new one, which a store writes only if it differs."""

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


def encode(circuit: Circuit, *, buckets: bool = True) -> str:
    """Compact JSON; without the window's buckets for a store that keeps them elsewhere."""
    d = asdict(circuit)
    if not buckets:
        del d["buckets"]
    return json.dumps(d, separators=(",", ":"))


def decode(raw: str | bytes | None) -> Circuit:
    """The stored circuit; a fresh closed one when nothing is stored yet."""
    if raw is None:
        return Circuit()
    d = json.loads(raw)
    return Circuit(
        **{
            **d,
            "state": State(d["state"]),
            "buckets": tuple(tuple(b) for b in d.get("buckets", ())),
            "left_window": tuple(d["left_window"]),
            "trials": tuple(tuple(t) for t in d["trials"]),
        }
    )


def _pct(part: int, whole: int) -> float:
    return 100 * part / whole if whole else 0.0


def _num(x: float) -> str:
    return f"{round(x, 1):g}"


def window_counts(c: Circuit, config: BreakerConfig, now: float) -> tuple[int, int, int]:
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
    calls, failures, slow = window_counts(c, config, now)
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


def generation(token: str) -> int:
    """The generation a permit's token belongs to."""
    return int(token.partition(".")[0])


def count_call(
    c: Circuit, gen: int, config: BreakerConfig, now: float, *, failed: bool, slow: bool
) -> Circuit:
    """The circuit with one result of a non-trial permit of generation ``gen`` in its window;
    unchanged unless it is CLOSED in that generation (results while open, forced open or
    disabled, or from before a change, count nowhere)."""
    if c.state is not State.CLOSED or c.gen != gen:
        return c
    return _add(c, config, now, failed=failed, slow=slow)


def closed_verdict(
    c: Circuit, gen: int, config: BreakerConfig, now: float
) -> tuple[Circuit, Steps]:
    """After a counted result of generation ``gen``: OPEN if the window's failure or slow-call
    rate reached its threshold over at least ``minimum_calls`` calls; else unchanged."""
    if c.state is not State.CLOSED or c.gen != gen:
        return c, []
    return _closed_verdict(c, config, now)


def trial_step(
    c: Circuit, token: str, config: BreakerConfig, *, success: bool, slow: bool, now: float
) -> tuple[Circuit, Steps]:
    """The circuit after one trial's result (a success only if not slow either), and the
    verdict once it was the last. Ignored (unchanged but for ``advance``) unless the permit is
    an outstanding trial of the current generation: a trial reported twice, after its permit
    timed out, or after a change counts once or not at all."""
    c, steps = advance(c, config, now)
    gen, _, serial = token.partition(".")
    if c.state is not State.HALF_OPEN or gen != str(c.gen):
        return c, steps
    if not any(str(t[0]) == serial for t in c.trials):
        return c, steps
    c = replace(
        c,
        trials=tuple(t for t in c.trials if str(t[0]) != serial),
        trials_done=c.trials_done + 1,
        trial_successes=c.trial_successes + (success and not slow),
    )
    c, more = _half_open_verdict(c, config, now)
    return c, steps + more


def admin_step(
    c: Circuit, target: State, config: BreakerConfig, now: float
) -> tuple[Circuit, Steps]:
    """``reset`` (target CLOSED, from any state: an empty window), ``force_open`` or
    ``disable``. Forcing or disabling a breaker already in that state changes nothing; a reset
    of a CLOSED breaker clears its window but reports no change of state."""
    if c.state is target and target is not State.CLOSED:
        return c, []
    window = window_counts(c, config, now) if c.state is State.CLOSED else c.left_window
    if target is State.CLOSED:
        cleared = dict(
            buckets=(), left_window=(0, 0, 0), opened_at=None, reopen_count=0, **NEW_ROUND
        )
        new, reason = _enter(c, target, open_until=None, **cleared), "reset"
    elif target is State.FORCED_OPEN:
        new = _enter(c, target, buckets=(), left_window=window, opened_at=now, open_until=None)
        reason = "forced open"
    else:
        new = _enter(c, target, buckets=(), left_window=window, opened_at=None, open_until=None)
        reason = "disabled"
    return new, ([] if c.state is target else [Change(c.state, target, now, reason)])


def snapshot_of(c: Circuit, config: BreakerConfig, now: float) -> Snapshot:
    calls, failures, slow = (
        window_counts(c, config, now) if c.state is State.CLOSED else c.left_window
    )
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
