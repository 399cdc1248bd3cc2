"""A batch's breaker results counted at once (``Breakers.record_batch``) decide exactly as the
same results recorded one after the other would: against both stores, on a fake clock."""

from __future__ import annotations

import random
import uuid

import pytest
import redis
from django.conf import settings

from routing_app.delivery.breaker import (
    BreakerConfig,
    Breakers,
    BreakerStore,
    MemoryBreakerStore,
    State,
)
from routing_app.delivery.breaker_redis import RedisBreakerStore

needs_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL")
P = 7
CFG = BreakerConfig(
    failure_rate=50,
    slow_rate=50,
    slow_call_ms=100,
    window_s=10,
    minimum_calls=4,
    open_s=30,
    half_open_calls=3,
    half_open_success=60,
    permit_timeout_s=5,
)
FAST, SLOW = 10, 150  # ms, either side of CFG.slow_call_ms
SEQUENCES = 40  # random result sequences compared, one batch and one by one


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.5

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_store(request):
    """Makes fresh stores of the test's kind; Redis ones under prefixes deleted afterwards."""
    prefixes, clients = [], []

    def make(kind: str) -> BreakerStore:
        if kind == "memory":
            return MemoryBreakerStore()
        prefixes.append(f"test_batches_{uuid.uuid4().hex[:8]}")
        clients.append(redis.Redis.from_url(settings.REDIS_URL))
        return RedisBreakerStore(clients[-1], prefixes[-1])

    yield make
    for client, prefix in zip(clients, prefixes, strict=True):
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


KINDS = ["memory", pytest.param("redis", marks=needs_redis)]


def permits(breakers: Breakers, n: int) -> list:
    out = []
    for _ in range(n):
        permit, _ = breakers.acquire(P, CFG)
        assert permit is not None
        out.append(permit)
    return out


def one_by_one(breakers: Breakers, results: list[tuple[bool, float]]) -> list:
    transitions = []
    for permit, (ok, ms) in zip(permits(breakers, len(results)), results, strict=True):
        t = breakers.record(permit, CFG, success=ok, duration_ms=ms)
        transitions += [t] if t else []
    return transitions


def as_batch(breakers: Breakers, results: list[tuple[bool, float]]) -> list:
    batch = [
        (p, ok, ms) for p, (ok, ms) in zip(permits(breakers, len(results)), results, strict=True)
    ]
    return breakers.record_batch(batch, CFG)


def outcome(breakers: Breakers, transitions: list) -> tuple:
    snap = breakers.snapshot(P, CFG)
    return (
        [(t.from_state, t.to_state, t.reason) for t in transitions],
        snap.state,
        snap.calls,
        snap.failures,
        snap.slow_calls,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_opens_at_the_result_that_reaches_the_threshold(make_store, kind):
    """Two failures then four successes: one by one, the fourth result makes 2 of 4 (50 %) and
    opens; the batch's totals alone (2 of 6) would not."""
    clock = FakeClock()
    breakers = Breakers(make_store(kind), clock)
    results = [(False, FAST)] * 2 + [(True, FAST)] * 4

    [transition] = as_batch(breakers, results)

    assert (transition.from_state, transition.to_state) == (State.CLOSED, State.OPEN)
    snap = breakers.snapshot(P, CFG)
    assert (snap.state, snap.calls, snap.failures) == (State.OPEN, 4, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_below_the_thresholds_is_counted_whole(make_store, kind):
    clock = FakeClock()
    breakers = Breakers(make_store(kind), clock)
    assert as_batch(breakers, [(True, FAST)] * 5 + [(False, SLOW)]) == []
    snap = breakers.snapshot(P, CFG)
    assert (snap.state, snap.calls, snap.failures, snap.slow_calls) == (State.CLOSED, 6, 1, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_decides_as_its_results_one_by_one_would(make_store, kind):
    rng = random.Random(20261204)  # noqa: S311  (test data, reproducible)
    opened = 0
    for _ in range(SEQUENCES):
        before = [(rng.random() < 0.8, rng.choice([FAST, SLOW])) for _ in range(rng.randrange(4))]
        batch = [(rng.random() < 0.7, rng.choice([FAST, FAST, SLOW])) for _ in range(8)]
        seen = []
        for record in (one_by_one, as_batch):
            clock = FakeClock()
            breakers = Breakers(make_store(kind), clock)
            one_by_one(breakers, before)
            seen.append(outcome(breakers, record(breakers, batch)))
        assert seen[0] == seen[1], (before, batch)
        opened += seen[0][1] is State.OPEN
    assert 0 < opened < SEQUENCES  # both kinds of ending were compared


@pytest.mark.parametrize("kind", KINDS)
def test_trial_results_in_a_batch_go_one_by_one(make_store, kind):
    clock = FakeClock()
    breakers = Breakers(make_store(kind), clock)
    one_by_one(breakers, [(False, FAST)] * 4)
    assert breakers.snapshot(P, CFG).state is State.OPEN
    clock.now += CFG.open_s + 1
    trials = permits(breakers, CFG.half_open_calls)
    assert all(p.trial for p in trials)

    transitions = breakers.record_batch([(p, True, FAST) for p in trials], CFG)

    assert [(t.from_state, t.to_state) for t in transitions] == [(State.HALF_OPEN, State.CLOSED)]
