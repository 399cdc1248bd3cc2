"""Alert rules: the state machine over synthetic merged snapshots with the test's clock
(pending, firing after ``for``, kept firing, resolved, reminders, silences, scopes), the seeded
rules on empty and real histories, the rule's own route, the gauges, the admin, and the proof
under real load: a slow webhook provider pushes p95 over 100 ms, the rule fires, an operator's
socket hears ``alert.firing`` once, and ``alert.resolved`` once the load is gone."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.urls import reverse
from limits.storage import MemoryStorage

from channels_app import socket_auth, tokens
from channels_app.hub import hub
from channels_app.routing import websocket_application
from routing_app.alerts import gauges, service
from routing_app.alerts.evaluation import evaluate, evaluate_merged
from routing_app.alerts.figures import scoped
from routing_app.alerts.notices import topic_of
from routing_app.delivery import breaker, limiter
from routing_app.delivery import service as delivery_service
from routing_app.delivery.breaker import Breakers, MemoryBreakerStore
from routing_app.ingest import NotificationIn, ingest
from routing_app.metrics import snapshot
from routing_app.metrics.figures import Merged, merge
from routing_app.metrics.instruments import LATENCY_BUCKETS
from routing_app.models import (
    Alert,
    AlertRule,
    Channel,
    Delivery,
    Notification,
    Provider,
    Route,
    Silence,
)
from tests.peers import HTTPReceiver, Reply

STEP = settings.METRICS_SNAPSHOT_S
T0 = 1_800_000_000.0  # the unit tests' clock: epoch seconds, a multiple of any snapshot step
WAIT_S = 10
LATENCY = "notify_delivery_duration_seconds"
ATTEMPTS = "notify_delivery_attempts_total"
SLOW, FAST = 0.3, 0.02  # seconds: above and below the seeded 100 ms


class Timeline:
    """Cumulative metrics of a synthetic deployment and its merged snapshots, one per step."""

    def __init__(self) -> None:
        self.counters: dict[tuple, float] = defaultdict(float)
        self.gauges: dict[tuple, float] = {}
        self.merged: list[Merged] = []

    def observe(self, seconds: float, count: int = 1, channel: str = "hook") -> None:
        for le in (*LATENCY_BUCKETS, math.inf):
            if seconds <= le:
                self.counters[(f"{LATENCY}_bucket", (("channel", channel), ("le", str(le))))] += (
                    count
                )
        self.counters[(f"{LATENCY}_count", (("channel", channel),))] += count
        self.counters[(f"{LATENCY}_sum", (("channel", channel),))] += seconds * count

    def attempt(self, channel: str, outcome: str, count: int = 1, provider: str = "p") -> None:
        labels = (("channel", channel), ("outcome", outcome), ("provider", provider))
        self.counters[(ATTEMPTS, labels)] += count

    def gauge(self, name: str, value: float, **labels: str) -> None:
        self.gauges[(name, tuple(sorted(labels.items())))] = value

    def snap(self, at: float) -> list[Merged]:
        self.merged.append(Merged(at=at, values={**self.counters, **self.gauges}, hosts=1))
        return self.merged


def rule(name: str = "delivery-latency-p95", **fields) -> AlertRule:
    """The seeded rule ``name`` with ``fields`` changed (the others disabled: one rule under
    test)."""
    AlertRule.objects.exclude(name=name).update(enabled=False)
    row = AlertRule.objects.get(name=name)
    for key, value in fields.items():
        setattr(row, key, value)
    row.save()
    return row


def stored(r: AlertRule) -> list[tuple[str, dict]]:
    rows = Notification.objects.filter(topic__name=topic_of(r)).order_by("seq")
    return [(n.event, n.data) for n in rows]


def states(changes) -> list[tuple[str | None, str]]:
    return [(c.from_state, c.to_state) for c in changes]


def run(timeline: Timeline, steps: list[float | None], start: int = 1) -> list:
    """One step per entry from ``T0 + start*STEP``: observe that latency (None: nothing), take
    the snapshot, evaluate; return each step's changes."""
    out = []
    for i, seconds in enumerate(steps, start=start):
        if seconds is not None:
            timeline.observe(seconds, 10)
        out.append(states(evaluate_merged(timeline.snap(T0 + i * STEP), T0 + i * STEP)))
    return out


@pytest.fixture
def timeline() -> Timeline:
    t = Timeline()
    t.snap(T0)
    return t


# --- the state machine -------------------------------------------------------------------------


@pytest.mark.django_db
def test_pending_fires_only_after_for_and_is_notified_once(timeline):
    r = rule(window_s=STEP, for_s=2 * STEP, keep_firing_for_s=2 * STEP, repeat_interval_s=3600)
    steps = run(timeline, [SLOW, SLOW, SLOW, SLOW])
    assert steps == [[(None, "pending")], [], [("pending", "firing")], []]
    alert = Alert.objects.get(rule=r)
    assert alert.state == "firing" and alert.scope_value == ""
    assert alert.pending_since == datetime.fromtimestamp(T0 + STEP, UTC)
    assert alert.fired_at == datetime.fromtimestamp(T0 + 3 * STEP, UTC)
    assert 0.25 < alert.value <= 0.5  # p95 within the bucket (0.25, 0.5], interpolated
    [(event, data)] = stored(r)
    assert event == "alert.firing"
    assert data == {
        "rule": "delivery-latency-p95",
        "scope": "",
        "value": alert.value,
        "threshold": 0.1,
        "comparator": ">",
        "description": "p95 delivery latency above 100 ms",
        "since": alert.fired_at.isoformat(),
        "repeat": False,
    }
    n = Notification.objects.get(topic__name="system.alerts.delivery-latency-p95")
    assert (n.source, n.severity) == ("system", "warning")
    assert [(h["from"], h["to"]) for h in alert.history] == [
        (None, "pending"),
        ("pending", "firing"),
    ]


@pytest.mark.django_db
def test_pending_that_stops_holding_resolves_unnotified(timeline):
    r = rule(window_s=STEP, for_s=3 * STEP)
    assert run(timeline, [SLOW, FAST]) == [[(None, "pending")], [("pending", "resolved")]]
    alert = Alert.objects.get(rule=r)
    assert alert.history[-1]["note"] == "never fired" and alert.fired_at is None
    assert stored(r) == [] and service.recent_resolved() == []
    assert service.counts()[r.name] == {"pending": 0, "firing": 0, "resolved": 0}


@pytest.mark.django_db
def test_firing_does_not_flap_within_keep_firing_for_and_resolves_after(timeline):
    r = rule(window_s=STEP, for_s=0, keep_firing_for_s=2 * STEP)
    steps = run(timeline, [SLOW, FAST, SLOW, FAST, FAST])
    assert steps == [
        [(None, "pending"), ("pending", "firing")],  # for 0: fires at once
        [],  # stopped holding 1 step ago: still firing
        [],  # holds again: the same alert goes on firing
        [],
        [("firing", "resolved")],  # has not held for keep_firing_for
    ]
    [alert] = Alert.objects.filter(rule=r)
    assert alert.state == "resolved"
    assert alert.resolved_at == datetime.fromtimestamp(T0 + 5 * STEP, UTC)
    assert [event for event, _ in stored(r)] == ["alert.firing", "alert.resolved"]
    resolved = stored(r)[1]
    assert resolved[1]["resolved_at"] == alert.resolved_at.isoformat()
    assert Notification.objects.filter(event="alert.resolved").get().severity == "info"
    assert service.recent_resolved() == [alert] and not service.firing().exists()
    page = service.overview()
    assert (page["firing"], page["pending"], page["resolved"]) == ([], [], [alert])
    assert page["counts"]["delivery-latency-p95"] == {"pending": 0, "firing": 0, "resolved": 1}


@pytest.mark.django_db
def test_a_new_alert_opens_after_a_resolved_one_which_stays_as_history(timeline):
    r = rule(window_s=STEP, for_s=0, keep_firing_for_s=0)
    run(timeline, [SLOW, FAST, SLOW])
    rows = list(Alert.objects.filter(rule=r).order_by("pk").values_list("state", flat=True))
    assert rows == ["resolved", "firing"]


@pytest.mark.django_db
def test_firing_is_notified_again_only_after_the_repeat_interval(timeline):
    r = rule(window_s=STEP, for_s=0, repeat_interval_s=60)
    run(timeline, [SLOW] * (60 // STEP + 2))
    events = [(event, data["repeat"]) for event, data in stored(r)]
    assert events == [("alert.firing", False), ("alert.firing", True)]
    alert = Alert.objects.get(rule=r)
    assert alert.last_notified_at == datetime.fromtimestamp(T0 + (1 + 60 // STEP) * STEP, UTC)
    assert alert.history[-1]["note"] == "notified again"


@pytest.mark.django_db
def test_silence_holds_the_notification_back_but_the_alert_is_recorded(timeline, operator):
    r = rule(window_s=STEP, for_s=0)
    quiet = service.silence(
        r.name,
        "",
        datetime.fromtimestamp(T0 + 2.5 * STEP, UTC),
        operator,
        "provider maintenance",
        starts_at=datetime.fromtimestamp(T0, UTC),
    )
    assert list(service.active_silences(datetime.fromtimestamp(T0 + STEP, UTC))) == [quiet]
    assert run(timeline, [SLOW, SLOW]) == [[(None, "pending"), ("pending", "firing")], []]
    alert = Alert.objects.get(rule=r)
    assert alert.state == "firing" and alert.silenced and alert.last_notified_at is None
    assert alert.history[-1]["note"] == f"silenced by {quiet}"
    assert stored(r) == []
    # The silence has ended: the alert still firing is heard, once.
    assert run(timeline, [SLOW, SLOW], start=3) == [[("firing", "firing")], []]
    assert [(event, data["repeat"]) for event, data in stored(r)] == [("alert.firing", False)]


@pytest.mark.django_db
def test_silence_of_another_scope_does_not_hold_it(timeline, operator):
    r = rule(window_s=STEP, for_s=0)
    service.silence(r, "mail", datetime.fromtimestamp(T0 + 99 * STEP, UTC), operator, "x")
    Silence.objects.update(starts_at=datetime.fromtimestamp(T0, UTC))
    run(timeline, [SLOW])
    assert [event for event, _ in stored(r)] == ["alert.firing"]


@pytest.mark.django_db
def test_each_scope_has_its_own_alert(timeline):
    r = rule("delivery-error-rate", window_s=STEP, for_s=0)
    timeline.attempt("mail", "sent", 5)
    timeline.attempt("mail", "transient", 5)  # 50 % fail
    timeline.attempt("hook", "sent", 10)  # 0 %
    timeline.attempt("hook", "started", 10)  # calls begun are not attempts' outcomes
    changes = evaluate_merged(timeline.snap(T0 + STEP), T0 + STEP)
    assert [(c.scope, c.to_state) for c in changes] == [("mail", "pending"), ("mail", "firing")]
    [alert] = Alert.objects.filter(rule=r)
    assert (alert.scope_value, alert.state, alert.value) == ("mail", "firing", 0.5)
    [(_, data)] = stored(r)
    assert data["scope"] == "mail"
    assert Notification.objects.get().severity == "error"


@pytest.mark.django_db
def test_fewer_than_two_snapshots_in_the_window_decide_nothing(timeline):
    r = rule(window_s=STEP, for_s=0, keep_firing_for_s=0)
    run(timeline, [SLOW])
    assert Alert.objects.get(rule=r).state == "firing"
    # No snapshot for a long while: no figure, no decision; the alert stays firing.
    assert evaluate_merged(timeline.merged, T0 + 20 * STEP) == []
    assert Alert.objects.get(rule=r).state == "firing"


@pytest.mark.django_db
def test_the_rules_route_delivers_it_whatever_its_topic_pattern(timeline):
    hook = Channel.objects.create(name="oncall-hook", kind="webhook")
    Provider.objects.create(channel=hook, name="pager", url="http://127.0.0.1:9/hook")
    route = Route.objects.create(name="on-call", topic_pattern="ops.#", min_severity="critical")
    route.channels.add(hook)
    rule(window_s=STEP, for_s=0, route=route)
    run(timeline, [SLOW])
    [row] = Delivery.objects.all()
    assert (row.channel, row.recipient) == (hook, "*")
    assert row.notification.event == "alert.firing"
    # The route alone is unchanged: a notification on another topic does not match it.
    ingest([NotificationIn(topic="billing.done", event="x", severity="critical")])
    assert Delivery.objects.count() == 1


@pytest.mark.django_db
def test_seeded_rules_evaluate_on_an_empty_and_a_realistic_history(timeline, caplog):
    assert AlertRule.objects.filter(enabled=True).count() == 5
    caplog.set_level(logging.WARNING, logger="routing_app.alerts")
    assert evaluate_merged([], T0) == []
    # Real snapshots of this process (everything it exports), then a synthetic busy minute.
    first, second = snapshot.collect(), snapshot.collect()
    real = merge({"this-host": [{**first, "at": T0}, {**second, "at": T0 + STEP}]})
    evaluate_merged(real, T0 + STEP)  # whatever this machine's figures decide, without error
    Alert.objects.all().delete()
    timeline.observe(FAST, 100, channel="mail")
    timeline.observe(FAST, 100, channel="websocket")
    timeline.attempt("mail", "sent", 100)
    timeline.gauge("notify_connections_active", 40, transport="websocket")
    timeline.gauge("notify_process_resident_memory_bytes", 200e6, role="web")
    timeline.gauge("notify_celery_queue_length", 3, queue="celery")
    timeline.snap(T0 + STEP)
    timeline.observe(FAST, 100, channel="mail")
    timeline.counters[
        ("notify_connections_closed_total", (("reason", "client"), ("transport", "websocket")))
    ] += 5
    timeline.snap(T0 + 2 * STEP)
    first, last = timeline.merged[0], timeline.merged[-1]
    figures = {r.name: scoped(r, first, last) for r in AlertRule.objects.all()}
    assert 0.01 < figures["delivery-latency-p95"][""] <= 0.025  # FAST's bucket
    assert figures["delivery-error-rate"] == {"mail": 0.0}
    assert figures["connection-drops"] == {"": 0.0}
    assert figures["process-memory"] == {"web": 200e6}
    assert figures["queue-depth"] == {"": 3}
    assert evaluate_merged(timeline.merged, T0 + 2 * STEP) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not Alert.objects.exists()


@pytest.mark.django_db
def test_connection_drop_rate_counts_closes_not_by_the_client_over_those_open_at_start(
    timeline,
):
    timeline.gauge("notify_connections_active", 10, transport="websocket")
    timeline.gauge("notify_connections_active", 5, transport="sse")
    start = timeline.snap(T0 + STEP)[-1]
    closed = "notify_connections_closed_total"
    timeline.counters[(closed, (("reason", "client"), ("transport", "websocket")))] += 3
    timeline.counters[(closed, (("reason", "heartbeat_timeout"), ("transport", "websocket")))] += 2
    end = timeline.snap(T0 + 2 * STEP)[-1]
    r = AlertRule.objects.get(name="connection-drops")
    assert scoped(r, start, end) == {"": 2 / 15}
    r.scope = "transport"
    assert scoped(r, start, end) == {"sse": 0.0, "websocket": 0.2}


@pytest.mark.django_db
def test_a_recorded_counter_compares_its_rate_per_second(timeline):
    r = AlertRule.objects.create(
        name="ingest-flood",
        metric="recorded",
        metric_name="notify_notifications_ingested",
        scope="all",
        comparator=">",
        threshold=100,
        window_s=STEP,
        for_s=0,
    )
    AlertRule.objects.exclude(pk=r.pk).update(enabled=False)
    timeline.counters[("notify_notifications_ingested_total", (("source", "api"),))] += 1000 * STEP
    [_, fired] = evaluate_merged(timeline.snap(T0 + STEP), T0 + STEP)
    assert fired.to_state == "firing" and fired.value == 1000


@pytest.mark.django_db
def test_rule_clean_refuses_a_scope_its_metric_has_no_figure_for():
    from django.core.exceptions import ValidationError

    r = AlertRule(name="q", metric="queue_depth", scope="channel", threshold=1)
    with pytest.raises(ValidationError, match="scope"):
        r.clean()
    with pytest.raises(ValidationError, match="name"):
        AlertRule(name="Upper", metric="queue_depth", threshold=1).clean()


@pytest.mark.django_db
def test_notify_alerts_gauges_count_alerts_by_rule_and_state(timeline):
    rule(window_s=STEP, for_s=0)
    run(timeline, [SLOW])
    [family] = list(gauges.read_alerts())
    samples = {(s.labels["rule"], s.labels["state"]): s.value for s in family.samples}
    assert samples[("delivery-latency-p95", "firing")] == 1
    assert samples[("delivery-latency-p95", "pending")] == 0
    assert samples[("queue-depth", "firing")] == 0
    exported = {(n, lb.get("rule"), lb.get("state")) for n, lb, _ in snapshot.collect()["samples"]}
    assert ("notify_alerts", "delivery-latency-p95", "firing") in exported


@pytest.mark.django_db
def test_a_second_evaluator_does_nothing_while_the_first_holds_the_lock(timeline, monkeypatch):
    from routing_app.alerts import evaluation

    rule(window_s=STEP, for_s=0)
    monkeypatch.setattr(snapshot, "history", lambda seconds=None: {"h": []})
    if settings.REDIS_URL:
        from routing_app.pubsub import sync_redis

        held = sync_redis().lock(f"{settings.REDIS_PREFIX}:alerts:evaluator", timeout=5)
    else:
        held = evaluation._memory_lock
    assert held.acquire(blocking=False)
    try:
        monkeypatch.setattr(evaluation, "evaluate_merged", lambda *a: pytest.fail("evaluated"))
        assert evaluate(T0) == []
    finally:
        held.release()


@pytest.mark.django_db
def test_silence_added_in_admin_is_created_by_the_user_and_filtered_by_being_in_force(
    client, admin_user
):
    client.force_login(admin_user)
    rule_row = AlertRule.objects.get(name="queue-depth")
    response = client.post(
        reverse("admin:routing_app_silence_add"),
        {
            "rule": rule_row.pk,
            "scope_value": "",
            "starts_at_0": "2026-01-01",
            "starts_at_1": "00:00:00",
            "ends_at_0": "2099-01-01",
            "ends_at_1": "00:00:00",
            "comment": "migrating the broker",
        },
    )
    assert response.status_code == 302, response.content
    row = Silence.objects.get()
    assert row.created_by == admin_user
    listing = client.get(reverse("admin:routing_app_silence_changelist"), {"active": "yes"})
    assert list(listing.context["cl"].result_list) == [row]
    ended = client.get(reverse("admin:routing_app_silence_changelist"), {"active": "ended"})
    assert list(ended.context["cl"].result_list) == []


# --- under real load -----------------------------------------------------------------------------


@pytest.fixture
def memory_guards(monkeypatch):
    """Breakers and the limiter of this test alone, in memory."""
    monkeypatch.setattr(breaker, "_breakers", Breakers(MemoryBreakerStore()))
    monkeypatch.setattr(limiter, "_limiter", limiter.Limiter(MemoryStorage()))


@pytest.fixture
def clean_snapshots():
    """This test's snapshots in Redis (under REDIS_PREFIX) removed before and after."""

    def wipe() -> None:
        if settings.REDIS_URL:
            from routing_app.pubsub import sync_redis

            client = sync_redis()
            for key in client.scan_iter(f"{settings.REDIS_PREFIX}:metrics:*"):
                client.delete(key)
        snapshot._local_history.clear()

    wipe()
    yield
    wipe()


@pytest.fixture
async def socket_edge(_db_pool_closed_at_end):
    socket_auth.forget_principals()
    yield
    await hub.aclose()
    socket_auth.forget_principals()


@pytest.mark.django_db(transaction=True)
async def test_slow_provider_fires_the_p95_rule_and_an_operator_hears_it_once_then_resolved(
    socket_edge, memory_guards, clean_snapshots, operator
):
    r = await sync_to_async(rule)(window_s=STEP, for_s=STEP, keep_firing_for_s=2 * STEP)
    topic = topic_of(r)
    token = await sync_to_async(tokens.mint)(operator.pk)
    comm = WebsocketCommunicator(websocket_application, f"/ws/{topic}/?token={token.token}")
    assert (await comm.connect(timeout=WAIT_S))[0]
    assert (await comm.receive_json_from(timeout=WAIT_S))["type"] == "subscribed"

    # Future snapshot times, whole steps: never in the same interval as the host's own
    # publisher's, if one runs in this process.
    base = (math.ceil(time.time() / STEP) + 3600 // STEP) * STEP
    with HTTPReceiver(default=Reply(delay_s=0.15)) as receiver:
        hook = await sync_to_async(Channel.objects.create)(name="slow-hook", kind="webhook")
        await sync_to_async(Provider.objects.create)(
            channel=hook, name="slow", url=receiver.url + "/hook"
        )

        def deliver(count: int) -> None:
            for _ in range(count):
                [result] = ingest([NotificationIn(topic="ops.deploys", event="deploy.done")])
                row = Delivery.objects.create(
                    notification_id=result.id, channel=hook, recipient="*"
                )
                delivery_service.deliver([row.pk])
                row.refresh_from_db()
                assert row.status == "sent"

        def step(i: int, load: int) -> list:
            deliver(load)
            snap = snapshot.collect()
            snap["at"] = base + i * STEP
            snapshot.publish(snap)
            return states(evaluate(now=base + i * STEP))

        assert await sync_to_async(step)(0, 0) == []
        assert await sync_to_async(step)(1, 3) == [(None, "pending")]
        assert await sync_to_async(step)(2, 3) == [("pending", "firing")]
        firing = await comm.receive_json_from(timeout=WAIT_S)
        assert (firing["topic"], firing["event"], firing["source"]) == (
            topic,
            "alert.firing",
            "system",
        )
        assert firing["data"]["value"] > 0.1 and firing["data"]["repeat"] is False
        assert await sync_to_async(step)(3, 3) == []  # still slow: firing, not notified again
        assert await comm.receive_nothing(timeout=0.2)

        receiver.default = Reply()  # the provider answers at once again
        assert await sync_to_async(step)(4, 3) == []  # kept firing for keep_firing_for
        assert await sync_to_async(step)(5, 3) == [("firing", "resolved")]
    resolved = await comm.receive_json_from(timeout=WAIT_S)
    assert (resolved["event"], resolved["severity"]) == ("alert.resolved", "info")
    assert resolved["data"]["value"] < 0.1
    assert await comm.receive_nothing(timeout=0.2)
    events = await sync_to_async(
        lambda: list(Notification.objects.filter(topic__name=topic).values_list("event", flat=True))
    )()
    assert events == ["alert.firing", "alert.resolved"]
    await comm.disconnect()
