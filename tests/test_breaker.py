"""The providers' circuit breaker: every transition of Resilience4j's semantics, against both
stores (memory and Redis) on a fake clock, and Redis shared atomically by two stores."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from django.conf import settings

from routing_app.delivery.breaker import (
    BreakerConfig,
    Breakers,
    BreakerStore,
    BreakerUnavailable,
    MemoryBreakerStore,
    Permit,
    State,
    breakers_from_settings,
    reset_breakers_for_tests,
)
from routing_app.delivery.breaker_redis import RedisBreakerStore
from routing_app.models import Channel
from tests.servers import free_port

needs_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL")

WAIT_S = 30  # upper bound for the threads of a concurrency test; passing runs take well under 1 s
P = 7  # the provider most tests use

# Small numbers so each test reads at once: 4 calls decide, 3 trials, 2 of 3 close.
CFG = BreakerConfig(
    failure_rate=25,
    slow_rate=50,
    slow_call_ms=100,
    window_s=10,
    minimum_calls=4,
    open_s=30,
    open_max_s=0,
    half_open_calls=3,
    half_open_success=60,
    permit_timeout_s=5,
)
FAST, SLOW = 10, 150  # ms, either side of CFG.slow_call_ms


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.5) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingStore(BreakerStore):
    """A store that counts the atomic updates (writes) it was asked for."""

    def __init__(self, inner: BreakerStore) -> None:
        self.inner = inner
        self.updates = 0

    def load(self, provider_id, *, window=True):
        return self.inner.load(provider_id, window=window)

    def update(self, provider_id, change):
        self.updates += 1
        return self.inner.update(provider_id, change)

    def add_call(self, *args, **kwargs):
        return self.inner.add_call(*args, **kwargs)


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test_breaker_{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_store(redis_prefix):
    """Makes stores under this test's prefix, each with its own client (own connection pool),
    as separate processes would have; their clients are closed afterwards."""
    clients = []

    def make() -> RedisBreakerStore:
        clients.append(redis.Redis.from_url(settings.REDIS_URL))
        return RedisBreakerStore(clients[-1], redis_prefix)

    yield make
    for client in clients:
        client.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def store(request) -> BreakerStore:
    if request.param == "memory":
        return MemoryBreakerStore()
    return request.getfixturevalue("redis_store")()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breakers(store, clock) -> Breakers:
    return Breakers(store, clock)


def call(breakers: Breakers, ok: bool = True, ms: float = FAST, config=CFG, provider=P):
    """One permitted call and its result; returns the transition the result caused."""
    permit, _ = breakers.acquire(provider, config)
    assert permit is not None, "the breaker refused a call the test expected it to permit"
    return breakers.record(permit, config, success=ok, duration_ms=ms)


def trip(breakers: Breakers, config=CFG, provider=P):
    """Open a closed breaker by failures; returns the transition."""
    transition = None
    for _ in range(config.minimum_calls):
        transition = call(breakers, ok=False, config=config, provider=provider)
    assert transition is not None and transition.to_state is State.OPEN
    return transition


def half_open(breakers: Breakers, clock: FakeClock, config=CFG) -> list[Permit]:
    """From OPEN past its period: every trial permit."""
    clock.advance(breakers.snapshot(P, config).open_until - clock())
    permits = [breakers.acquire(P, config)[0] for _ in range(config.half_open_calls)]
    assert all(p is not None and p.trial for p in permits)
    return permits


def state(breakers: Breakers, config=CFG) -> State:
    return breakers.snapshot(P, config).state


# --- CLOSED ----------------------------------------------------------------------------------


def test_closed_opens_when_failure_rate_reaches_threshold(breakers, clock):
    assert [call(breakers) for _ in range(3)] == [None] * 3
    transition = call(breakers, ok=False)  # 1 of 4 = 25 %: reaching the threshold is enough

    assert (transition.from_state, transition.to_state) == (State.CLOSED, State.OPEN)
    assert transition.provider_id == P and transition.at == clock()
    assert transition.reason == "failure rate 25 % >= 25 % over 4 calls"
    snap = transition.snapshot
    assert (snap.state, snap.calls, snap.failures, snap.failure_rate) == (State.OPEN, 4, 1, 25.0)
    assert (snap.opened_at, snap.open_until) == (clock(), clock() + CFG.open_s)


def test_closed_stays_closed_below_both_rates(breakers):
    config = BreakerConfig(failure_rate=30, slow_rate=50, slow_call_ms=100, minimum_calls=4)
    for ok, ms in [(True, FAST), (True, SLOW), (False, FAST), (True, FAST)]:
        assert call(breakers, ok=ok, ms=ms, config=config) is None
    snap = breakers.snapshot(P, config)
    assert (snap.state, snap.calls, snap.failure_rate, snap.slow_rate) == (
        State.CLOSED,
        4,
        25.0,
        25.0,
    )


def test_closed_opens_when_slow_call_rate_reaches_threshold(breakers):
    for ms in (FAST, SLOW, FAST):
        assert call(breakers, ms=ms) is None
    transition = call(breakers, ms=SLOW)  # 2 of 4 slow, every call a success

    assert transition.to_state is State.OPEN
    assert transition.reason == "slow-call rate 50 % >= 50 % over 4 calls (slower than 100 ms)"
    assert (transition.snapshot.slow_calls, transition.snapshot.failures) == (2, 0)


def test_slow_failure_counts_as_slow_and_as_failure(breakers):
    call(breakers, ok=False, ms=SLOW)
    snap = breakers.snapshot(P, CFG)
    assert (snap.calls, snap.failures, snap.slow_calls) == (1, 1, 1)


def test_call_as_long_as_slow_call_ms_is_not_slow(breakers):
    call(breakers, ms=CFG.slow_call_ms)
    assert breakers.snapshot(P, CFG).slow_calls == 0


def test_no_decision_before_minimum_calls(breakers):
    for _ in range(CFG.minimum_calls - 1):
        assert call(breakers, ok=False) is None  # 100 % failures, but too few calls
    assert state(breakers) is State.CLOSED
    assert call(breakers, ok=False).to_state is State.OPEN


def test_calls_older_than_the_window_expire(breakers, clock):
    for _ in range(3):
        call(breakers, ok=False)
    clock.advance(CFG.window_s - 1)  # the first second is still in the window
    assert breakers.snapshot(P, CFG).calls == 3
    clock.advance(1)  # now it is not
    assert breakers.snapshot(P, CFG).calls == 0

    assert call(breakers, ok=False) is None  # 1 call in the window: no decision
    assert state(breakers) is State.CLOSED


def test_window_sums_the_last_window_s_one_second_buckets(breakers, clock):
    for second in range(CFG.window_s):
        clock.advance(1 if second else 0)
        call(breakers)
    assert breakers.snapshot(P, CFG).calls == CFG.window_s  # one call in each of 10 buckets
    clock.advance(1)
    assert breakers.snapshot(P, CFG).calls == CFG.window_s - 1  # the oldest bucket went


def test_providers_have_their_own_breakers(breakers):
    trip(breakers, provider=1)
    assert breakers.snapshot(1, CFG).state is State.OPEN
    assert breakers.snapshot(2, CFG).state is State.CLOSED
    assert breakers.acquire(2, CFG)[0] is not None


# --- OPEN -> HALF_OPEN -------------------------------------------------------------------------


def test_open_refuses_until_open_s_passes(breakers, clock):
    trip(breakers)
    clock.advance(CFG.open_s - 0.1)
    assert breakers.acquire(P, CFG) == (None, None)
    assert breakers.permits(P, CFG) is False


def test_first_acquire_after_open_s_moves_to_half_open_and_is_a_trial(breakers, clock):
    trip(breakers)
    clock.advance(CFG.open_s)
    assert breakers.permits(P, CFG) is True

    permit, transition = breakers.acquire(P, CFG)

    assert permit is not None and permit.trial
    assert (transition.from_state, transition.to_state) == (State.OPEN, State.HALF_OPEN)
    assert transition.reason == "open for 30 s: letting 3 trial calls through"
    assert (transition.snapshot.trials_issued, transition.snapshot.trials_done) == (1, 0)


def test_half_open_hands_out_exactly_half_open_calls_permits(breakers, clock):
    trip(breakers)
    clock.advance(CFG.open_s)
    for _ in range(CFG.half_open_calls):
        assert breakers.permits(P, CFG) is True
        assert breakers.acquire(P, CFG)[0].trial

    assert breakers.acquire(P, CFG) == (None, None)
    assert breakers.permits(P, CFG) is False
    assert breakers.snapshot(P, CFG).trials_issued == CFG.half_open_calls


# --- HALF_OPEN verdict ---------------------------------------------------------------------------


def test_half_open_decides_only_after_every_trial_not_on_the_first_failure(breakers, clock):
    trip(breakers)
    first, second, third = half_open(breakers, clock)

    assert breakers.record(first, CFG, success=False, duration_ms=FAST) is None
    assert breakers.record(second, CFG, success=True, duration_ms=FAST) is None
    assert state(breakers) is State.HALF_OPEN
    transition = breakers.record(third, CFG, success=True, duration_ms=FAST)

    assert (transition.from_state, transition.to_state) == (State.HALF_OPEN, State.CLOSED)
    assert transition.reason == "2 of 3 trial calls succeeded (66.7 % >= 60 %)"


def test_half_open_closes_at_exactly_the_success_share(breakers, clock):
    config = BreakerConfig(minimum_calls=2, half_open_calls=5, half_open_success=80)
    trip(breakers, config=config)
    permits = half_open(breakers, clock, config)
    for permit, ok in zip(permits, [True, False, True, True, True], strict=True):
        transition = breakers.record(permit, config, success=ok, duration_ms=FAST)
    assert transition.to_state is State.CLOSED
    assert transition.reason == "4 of 5 trial calls succeeded (80 % >= 80 %)"


def test_half_open_closes_with_a_clear_window(breakers, clock):
    trip(breakers)
    for permit in half_open(breakers, clock):
        breakers.record(permit, CFG, success=True, duration_ms=FAST)
    snap = breakers.snapshot(P, CFG)
    assert (snap.state, snap.calls, snap.failures, snap.opened_at) == (State.CLOSED, 0, 0, None)
    assert breakers.acquire(P, CFG)[0].trial is False


def test_half_open_reopens_below_the_success_share(breakers, clock):
    trip(breakers)
    first, second, third = half_open(breakers, clock)
    breakers.record(first, CFG, success=True, duration_ms=FAST)
    breakers.record(second, CFG, success=False, duration_ms=FAST)
    transition = breakers.record(third, CFG, success=False, duration_ms=FAST)

    assert (transition.from_state, transition.to_state) == (State.HALF_OPEN, State.OPEN)
    assert transition.reason == "1 of 3 trial calls succeeded (33.3 % < 60 %); open for 30 s"
    assert transition.snapshot.open_until == clock() + CFG.open_s
    assert breakers.acquire(P, CFG) == (None, None)


def test_slow_trial_counts_as_unsuccessful(breakers, clock):
    trip(breakers)
    first, second, third = half_open(breakers, clock)
    breakers.record(first, CFG, success=True, duration_ms=FAST)
    breakers.record(second, CFG, success=True, duration_ms=SLOW)
    transition = breakers.record(third, CFG, success=True, duration_ms=SLOW)
    assert transition.to_state is State.OPEN


def test_trial_recorded_twice_counts_once(breakers, clock):
    trip(breakers)
    first, _, _ = half_open(breakers, clock)
    breakers.record(first, CFG, success=True, duration_ms=FAST)
    breakers.record(first, CFG, success=True, duration_ms=FAST)
    snap = breakers.snapshot(P, CFG)
    assert (snap.state, snap.trials_done, snap.trial_successes) == (State.HALF_OPEN, 1, 1)


# --- growth of the open duration -----------------------------------------------------------------


def reopen(breakers: Breakers, clock: FakeClock, config):
    for permit in half_open(breakers, clock, config):
        transition = breakers.record(permit, config, success=False, duration_ms=FAST)
    return transition


def test_each_reopen_doubles_the_open_duration_up_to_open_max_s(breakers, clock):
    config = BreakerConfig(minimum_calls=2, open_s=10, open_max_s=35, half_open_calls=1)
    first = trip(breakers, config=config)
    assert first.snapshot.open_until - first.snapshot.opened_at == 10

    durations = []
    for _ in range(3):
        snap = reopen(breakers, clock, config).snapshot
        durations.append((snap.open_until - snap.opened_at, snap.reopen_count))
    assert durations == [(20, 1), (35, 2), (35, 3)]


def test_close_resets_the_growth_of_the_open_duration(breakers, clock):
    config = BreakerConfig(minimum_calls=2, open_s=10, open_max_s=80, half_open_calls=1)
    trip(breakers, config=config)
    reopen(breakers, clock, config)
    (permit,) = half_open(breakers, clock, config)
    assert breakers.record(permit, config, success=True, duration_ms=FAST).to_state is State.CLOSED

    snap = trip(breakers, config=config).snapshot
    assert (snap.open_until - snap.opened_at, snap.reopen_count) == (10, 0)


def test_open_duration_never_grows_when_open_max_s_is_not_above_open_s(breakers, clock):
    config = BreakerConfig(minimum_calls=2, open_s=10, open_max_s=10, half_open_calls=1)
    trip(breakers, config=config)
    for _ in range(2):
        snap = reopen(breakers, clock, config).snapshot
        assert snap.open_until - snap.opened_at == 10


# --- permits never recorded ----------------------------------------------------------------------


def test_trial_not_recorded_within_permit_timeout_counts_as_failed(breakers, clock):
    trip(breakers)
    first, second, lost = half_open(breakers, clock)
    issued_at = clock()
    breakers.record(first, CFG, success=True, duration_ms=FAST)
    breakers.record(second, CFG, success=False, duration_ms=FAST)
    clock.advance(CFG.permit_timeout_s - 0.1)
    assert state(breakers) is State.HALF_OPEN  # the worker may still report
    clock.advance(0.1)

    snap = breakers.snapshot(P, CFG)  # 1 of 3: re-open, dated at the permit's expiry
    assert (snap.state, snap.trials_done, snap.opened_at) == (
        State.OPEN,
        3,
        issued_at + CFG.permit_timeout_s,
    )
    # Too late to count; the first write after the expiry is the one that reports the re-open.
    transition = breakers.record(lost, CFG, success=True, duration_ms=FAST)
    assert (transition.to_state, transition.at) == (State.OPEN, issued_at + CFG.permit_timeout_s)
    assert transition.reason.startswith("1 of 3 trial calls succeeded, 1 not recorded in time")
    assert breakers.snapshot(P, CFG).trial_successes == 1


def test_timed_out_trials_do_not_wedge_half_open(breakers, clock):
    trip(breakers)
    half_open(breakers, clock)  # three workers die mid-call
    assert breakers.permits(P, CFG) is False

    clock.advance(CFG.permit_timeout_s)  # now re-opened, at the permits' expiry ...
    assert breakers.permits(P, CFG) is False
    clock.advance(CFG.open_s)  # ... and that open period is over too
    assert breakers.permits(P, CFG) is True

    permit, transition = breakers.acquire(P, CFG)
    assert permit is not None and permit.trial
    assert (transition.from_state, transition.to_state) == (State.HALF_OPEN, State.HALF_OPEN)
    assert transition.reason == (
        "0 of 3 trial calls succeeded, 3 not recorded in time (0 % < 60 %); open for 30 s"
        "; then open for 30 s: letting 3 trial calls through"
    )


def test_timed_out_trial_can_complete_a_close(breakers, clock):
    config = BreakerConfig(half_open_calls=3, half_open_success=60, minimum_calls=2)
    trip(breakers, config=config)
    first, second, _ = half_open(breakers, clock, config)
    breakers.record(first, config, success=True, duration_ms=FAST)
    breakers.record(second, config, success=True, duration_ms=FAST)
    clock.advance(config.permit_timeout_s)

    permit, transition = breakers.acquire(P, config)
    assert transition.to_state is State.CLOSED
    assert transition.reason == (
        "2 of 3 trial calls succeeded, 1 not recorded in time (66.7 % >= 60 %)"
    )
    assert permit is not None and not permit.trial


# --- generations -------------------------------------------------------------------------------


def test_closed_permit_recorded_after_half_open_is_not_a_trial(breakers, clock):
    late, _ = breakers.acquire(P, CFG)  # a closed-state call still in flight ...
    trip(breakers)
    half_open(breakers, clock)
    assert breakers.record(late, CFG, success=True, duration_ms=FAST) is None  # ... ends now
    snap = breakers.snapshot(P, CFG)
    assert (snap.state, snap.trials_done, snap.trial_successes) == (State.HALF_OPEN, 0, 0)


def test_result_recorded_while_open_is_ignored(breakers):
    late, _ = breakers.acquire(P, CFG)
    before = trip(breakers).snapshot
    assert breakers.record(late, CFG, success=False, duration_ms=FAST) is None
    assert breakers.snapshot(P, CFG) == before


def test_trial_of_an_earlier_half_open_is_ignored(breakers, clock):
    config = BreakerConfig(minimum_calls=2, half_open_calls=2, permit_timeout_s=5)
    trip(breakers, config=config)
    stale, _ = half_open(breakers, clock, config)
    clock.advance(config.permit_timeout_s + config.open_s)  # both lost: re-open, then over
    half_open(breakers, clock, config)

    assert breakers.record(stale, config, success=True, duration_ms=FAST) is None
    assert breakers.snapshot(P, config).trials_done == 0


def test_closed_permit_from_before_a_reset_is_ignored(breakers):
    late, _ = breakers.acquire(P, CFG)
    call(breakers, ok=False)
    breakers.reset(P)
    breakers.record(late, CFG, success=False, duration_ms=FAST)
    assert breakers.snapshot(P, CFG).calls == 0


# --- admin -------------------------------------------------------------------------------------


def test_forced_open_refuses_until_reset(breakers, clock):
    transition = breakers.force_open(P)
    assert (transition.from_state, transition.to_state) == (State.CLOSED, State.FORCED_OPEN)
    assert breakers.force_open(P) is None  # already

    clock.advance(3600)
    assert breakers.acquire(P, CFG) == (None, None)
    assert breakers.permits(P, CFG) is False

    assert breakers.reset(P).to_state is State.CLOSED
    assert breakers.acquire(P, CFG)[0] is not None


def test_disabled_always_permits_and_records_nothing(breakers):
    trip(breakers)
    transition = breakers.disable(P)
    assert (transition.from_state, transition.to_state) == (State.OPEN, State.DISABLED)

    for _ in range(3 * CFG.minimum_calls):
        assert call(breakers, ok=False, ms=SLOW) is None
    assert breakers.permits(P, CFG) is True
    snap = breakers.snapshot(P, CFG)
    assert (snap.state, snap.trials_issued) == (State.DISABLED, 0)
    assert breakers.reset(P).to_state is State.CLOSED
    assert breakers.snapshot(P, CFG).calls == 0


def test_reset_closes_any_state_with_a_clear_window(breakers, clock):
    call(breakers, ok=False)
    assert breakers.reset(P) is None  # already closed: no transition, but ...
    assert breakers.snapshot(P, CFG).calls == 0  # ... the window is clear

    config = BreakerConfig(minimum_calls=2, open_s=10, open_max_s=80, half_open_calls=1)
    trip(breakers, config=config)
    reopen(breakers, clock, config)
    transition = breakers.reset(P)
    assert (transition.from_state, transition.to_state, transition.reason) == (
        State.OPEN,
        State.CLOSED,
        "reset",
    )
    snap = transition.snapshot
    assert (snap.calls, snap.reopen_count, snap.opened_at, snap.open_until) == (0, 0, None, None)


# --- cost ----------------------------------------------------------------------------------------


def test_acquire_in_closed_writes_nothing(store, clock):
    counting = CountingStore(store)
    breakers = Breakers(counting, clock)
    for _ in range(5):
        assert breakers.acquire(P, CFG)[0] is not None
    assert counting.updates == 0


def test_closed_results_below_the_thresholds_need_no_transaction(store, clock):
    counting = CountingStore(store)
    breakers = Breakers(counting, clock)
    for _ in range(6):
        assert call(breakers) is None
    assert call(breakers, ok=False) is None  # 1 of 7 failed
    assert counting.updates == 0
    assert breakers.snapshot(P, CFG).calls == 7
    assert call(breakers, ok=False).to_state is State.OPEN  # 2 of 8 >= 25 %
    assert counting.updates == 1  # the transaction that opened it


def test_refusals_snapshot_and_permits_write_nothing(store, clock):
    counting = CountingStore(store)
    breakers = Breakers(counting, clock)
    trip(breakers)
    half_open(breakers, clock)
    writes = counting.updates

    assert breakers.acquire(P, CFG) == (None, None)
    breakers.snapshot(P, CFG)
    breakers.permits(P, CFG)
    assert counting.updates == writes
    assert breakers.snapshot(P, CFG).trials_issued == CFG.half_open_calls


# --- configuration and the process's breakers -----------------------------------------------------


def test_config_for_channel_reads_its_breaker_fields():
    channel = Channel(
        name="mail",
        kind=Channel.Kind.EMAIL,
        breaker_failure_rate=7,
        breaker_slow_rate=40,
        breaker_slow_call_ms=300,
        breaker_window_s=120,
        breaker_minimum_calls=50,
        breaker_open_s=15,
        breaker_open_max_s=240,
        breaker_half_open_calls=5,
        breaker_half_open_success=90,
        breaker_call_timeout_ms=1500,
    )
    assert BreakerConfig.for_channel(channel) == BreakerConfig(
        failure_rate=7,
        slow_rate=40,
        slow_call_ms=300,
        window_s=120,
        minimum_calls=50,
        open_s=15,
        open_max_s=240,
        half_open_calls=5,
        half_open_success=90,
        permit_timeout_s=4.0,
    )


@pytest.fixture
def fresh_process_breakers():
    reset_breakers_for_tests()
    yield
    reset_breakers_for_tests()


@needs_redis
def test_process_breakers_live_in_redis_under_the_prefix(fresh_process_breakers):
    breakers = breakers_from_settings()
    assert breakers is breakers_from_settings()
    assert isinstance(breakers.store, RedisBreakerStore)
    assert breakers.store.key(P) == f"{settings.REDIS_PREFIX}:breaker:{P}"


def test_process_breakers_are_in_memory_without_redis(fresh_process_breakers, settings):
    settings.REDIS_URL = ""
    breakers = breakers_from_settings()
    assert isinstance(breakers.store, MemoryBreakerStore)
    reset_breakers_for_tests()
    assert breakers_from_settings() is not breakers


@needs_redis
def test_redis_window_drops_seconds_that_left_it_and_expires_when_idle(redis_store, clock):
    store = redis_store()
    breakers = Breakers(store, clock)
    call(breakers)
    clock.advance(3)
    call(breakers)
    clock.advance(CFG.window_s + 5)  # both seconds left the window; no call ended in between
    call(breakers, ok=False)

    window = store.window_key(P, 0)
    assert sorted(store.client.hkeys(window)) == [
        f"c:{int(clock())}".encode(),
        f"f:{int(clock())}".encode(),
    ]
    assert 0 < store.client.ttl(window) <= CFG.window_s + 1


@needs_redis
def test_redis_circuit_key_has_no_ttl(redis_store, clock):
    store = redis_store()
    trip(Breakers(store, clock))
    assert store.client.ttl(store.key(P)) == -1


def test_unreachable_redis_raises_breaker_unavailable(clock):
    client = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=None)
    breakers = Breakers(RedisBreakerStore(client, "test_breaker_unreachable"), clock)
    with pytest.raises(BreakerUnavailable):
        breakers.acquire(P, CFG)
    with pytest.raises(BreakerUnavailable):
        breakers.record(Permit(P, "0", False), CFG, success=True, duration_ms=FAST)
    with pytest.raises(BreakerUnavailable):
        breakers.force_open(P)


# --- shared through Redis ------------------------------------------------------------------------


def run_together(*jobs):
    """Run each job in its own thread, all released at once; their results, in order."""
    barrier = threading.Barrier(len(jobs))

    def start(job):
        barrier.wait(WAIT_S)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(start, job) for job in jobs]
        return [f.result(timeout=WAIT_S) for f in futures]


@needs_redis
def test_two_stores_hand_out_exactly_half_open_calls_trials_in_total(redis_store, clock):
    config = BreakerConfig(minimum_calls=2, half_open_calls=10, open_s=30)
    one, two = (Breakers(redis_store(), clock) for _ in range(2))
    trip(one, config=config)
    clock.advance(config.open_s)

    def grab(breakers: Breakers):
        return lambda: [breakers.acquire(P, config)[0] for _ in range(25)]

    got = [p for batch in run_together(grab(one), grab(two)) for p in batch if p is not None]

    assert len(got) == config.half_open_calls
    assert len({p.token for p in got}) == config.half_open_calls
    assert two.snapshot(P, config).trials_issued == config.half_open_calls


@needs_redis
def test_two_stores_count_every_result(redis_store, clock):
    config = BreakerConfig(minimum_calls=1000, window_s=60)
    one, two = (Breakers(redis_store(), clock) for _ in range(2))

    def report(breakers: Breakers):
        return lambda: [call(breakers, config=config) for _ in range(200)]

    run_together(report(one), report(two))
    assert one.snapshot(P, config).calls == 400


@needs_redis
def test_two_stores_racing_to_open_open_it_once(redis_store, clock):
    config = BreakerConfig(minimum_calls=10, failure_rate=50)
    one, two = (Breakers(redis_store(), clock) for _ in range(2))

    def fail(breakers: Breakers):
        def job():
            transitions = []
            for _ in range(30):
                permit, _ = breakers.acquire(P, config)
                if permit is not None:
                    transitions.append(
                        breakers.record(permit, config, success=False, duration_ms=FAST)
                    )
            return [t for t in transitions if t is not None]

        return job

    transitions = [t for batch in run_together(fail(one), fail(two)) for t in batch]

    assert [(t.from_state, t.to_state) for t in transitions] == [(State.CLOSED, State.OPEN)]
    assert one.snapshot(P, config).state is State.OPEN
