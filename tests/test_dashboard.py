"""The operators' dashboard through Django's test client: every page and action needs staff,
each page renders with and without data (the empty states say what to do next), and the actions
change what they say: breaker reset and force-open, replay, silences, the console's publish."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from channels_app.hub import hub
from routing_app.dashboard import charts, ticks
from routing_app.delivery.breaker import breakers_from_settings, reset_breakers_for_tests
from routing_app.ingest import NotificationIn, ingest
from routing_app.metrics import snapshot
from routing_app.models import (
    Alert,
    AlertRule,
    Attempt,
    BreakerState,
    Channel,
    Delivery,
    Notification,
    Provider,
    Silence,
    Topic,
)
from tests.test_hub import WAIT_S, Recorder, clean_hub  # noqa: F401  (a fixture)

PAGES = ["overview", "channels", "topics", "deliveries", "alerts"]
ACTIONS = [
    ("dashboard:breaker", {"action": "open"}),
    ("dashboard:replay", {}),
    ("dashboard:console-publish", {"topic": "ops.test", "event": "console.test"}),
]
LOGIN = "/admin/login/"


def page_url(name: str) -> str:
    return reverse(f"dashboard:{name}")


@pytest.fixture
def staff(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def fresh_breakers():
    reset_breakers_for_tests()
    yield
    reset_breakers_for_tests()


@pytest.fixture
def mail(db, fresh_breakers):
    """An email channel with one provider, a dead delivery with two attempts, a sent one."""
    channel = Channel.objects.create(name="mail", kind="email")
    relay = Provider.objects.create(channel=channel, name="relay", url="console://", weight=3)
    # Redis outlives the test database: an earlier run's provider with this id may have left
    # its breaker open.
    breakers_from_settings().reset(relay.pk)
    [result] = ingest([NotificationIn(topic="alerts.k8s", event="pod.crash", data={"pod": "a"})])
    notification = Notification.objects.get(pk=result.id)
    dead = Delivery.objects.create(
        notification=notification,
        channel=channel,
        recipient="ops@example.com",
        status=Delivery.Status.DEAD,
        attempts=2,
        provider=relay,
        last_error="550 mailbox unavailable",
    )
    for number, outcome in [(1, "transient"), (2, "permanent")]:
        Attempt.objects.create(
            delivery=dead, number=number, provider=relay, outcome=outcome, duration_ms=12
        )
    sent = Delivery.objects.create(
        notification=notification,
        channel=channel,
        recipient="boss@example.com",
        status=Delivery.Status.SENT,
        attempts=1,
        provider=relay,
    )
    return {"channel": channel, "provider": relay, "dead": dead, "sent": sent}


@pytest.fixture
def snapshots():
    """Two snapshots of a host, 5 s apart, in the real snapshot store (Redis with REDIS_URL):
    50 notifications ingested and 40 handed to sockets in between, 3 open connections."""
    host = "dashboard-test-host"
    step = settings.METRICS_SNAPSHOT_S
    now = time.time()

    def snap(at: float, ingested: float, sent: float) -> dict:
        return {
            "host": host,
            "at": at,
            "samples": [
                ["notify_notifications_ingested_total", {"source": "api"}, ingested],
                ["notify_messages_sent_total", {"transport": "websocket"}, sent],
                ["notify_connections_active", {"transport": "websocket"}, 2.0],
                ["notify_connections_active", {"transport": "sse"}, 1.0],
                ["notify_process_resident_memory_bytes", {"role": "web"}, 150e6],
            ],
        }

    _forget_snapshots()
    snapshot.publish(snap(now - step, 100.0, 60.0))
    snapshot.publish(snap(now, 150.0, 100.0))
    yield
    _forget_snapshots()


def _forget_snapshots() -> None:
    snapshot._local_history.clear()
    if settings.REDIS_URL:
        from routing_app.pubsub import sync_redis

        client = sync_redis()
        keys = list(client.scan_iter(f"{settings.REDIS_PREFIX}:metrics:*"))
        if keys:
            client.delete(*keys)


# --- who may see it ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", PAGES)
def test_anonymous_is_sent_to_the_login(client, name):
    response = client.get(page_url(name))
    assert response.status_code == 302
    assert response.url.startswith(LOGIN)


@pytest.mark.parametrize("name", PAGES)
def test_a_user_who_is_not_staff_is_sent_to_the_login(client, subscriber, name):
    client.force_login(subscriber)
    response = client.get(page_url(name))
    assert response.status_code == 302
    assert response.url.startswith(LOGIN)


@pytest.mark.parametrize(("name", "data"), ACTIONS)
def test_actions_refuse_users_who_are_not_staff(client, subscriber, mail, name, data):
    client.force_login(subscriber)
    args = {
        "dashboard:breaker": [mail["provider"].pk],
        "dashboard:replay": [mail["dead"].pk],
    }.get(name, [])
    response = client.post(reverse(name, args=args), data)
    assert response.status_code == 302 and response.url.startswith(LOGIN)
    mail["dead"].refresh_from_db()
    assert mail["dead"].status == Delivery.Status.DEAD
    assert not BreakerState.objects.filter(state="forced_open").exists()
    assert not Topic.objects.filter(name="ops.test").exists()


def test_adding_a_silence_needs_staff(client, subscriber):
    client.force_login(subscriber)
    response = client.post(page_url("alerts"), {"ends_at": "2030-01-01T00:00", "comment": "x"})
    assert response.status_code == 302 and response.url.startswith(LOGIN)
    assert not Silence.objects.exists()


def test_home_sends_staff_to_the_dashboard(staff):
    response = staff.get("/")
    assert response.status_code == 302
    assert response.url == page_url("overview")


@pytest.mark.django_db
def test_home_shows_anonymous_and_other_users_the_home_page(client, subscriber):
    assert b"Routes notifications" in client.get("/").content
    client.force_login(subscriber)
    response = client.get("/")
    assert response.status_code == 200 and b"Routes notifications" in response.content


# --- pages, empty -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("overview", "No figures yet"),
        ("channels", "No channels yet"),
        ("topics", "No topics yet"),
        ("deliveries", "No deliveries yet"),
        ("alerts", "Nothing is firing."),
    ],
)
def test_each_page_says_what_to_do_when_there_is_nothing(staff, name, says):
    if name == "overview":
        _forget_snapshots()
    response = staff.get(page_url(name))
    assert response.status_code == 200
    text = response.content.decode()
    assert says in text
    for other in PAGES:  # one nav on every page
        assert f'href="{page_url(other)}"' in text


# --- overview -----------------------------------------------------------------------------------


def test_overview_shows_the_figures_of_the_snapshots(staff, snapshots):
    response = staff.get(page_url("overview"))
    text = response.content.decode()
    assert "No figures yet" not in text
    assert ">10.0/s<" in text  # 50 notifications in 5 s
    assert ">8.0/s<" in text  # 40 handed to sockets
    assert ">150 MB<" in text
    [point] = response.context["points"]
    assert point["connections_active"] == {"websocket": 2.0, "sse": 1.0}
    assert 'data-points="1"' in text
    assert "/static/vendor/uplot/uPlot.esm.js" in text
    assert f'"{reverse("events", args=["system.dashboard"])}"' in text


def test_a_tick_carries_the_same_point_a_reload_would_draw(snapshots):
    assert charts.latest_point() == charts.history_points()[-1]


@pytest.mark.django_db(transaction=True)
async def test_a_tick_reaches_the_topics_subscribers_once_and_is_not_stored(
    clean_hub,  # noqa: F811  (the imported fixture)
    snapshots,
):
    recorder = Recorder("sse")
    await hub.subscribe(ticks.TOPIC, recorder)
    if settings.REDIS_URL:  # a lease an earlier run's process may still hold
        from routing_app.pubsub import sync_redis

        sync_redis().delete(f"{settings.REDIS_PREFIX}:dashboard:ticker")
    assert await sync_to_async(ticks.publish_tick)() is True
    deadline = time.monotonic() + WAIT_S
    while not recorder.events:
        recorder.changed.clear()
        await asyncio.wait_for(recorder.changed.wait(), deadline - time.monotonic())
    [(topic, event, payload)] = recorder.events
    assert (topic, event) == ("system.dashboard", "dashboard.tick")
    assert payload == await sync_to_async(charts.latest_point)()
    assert payload["notifications_in_per_s"] == 10.0
    assert recorder.seqs == []  # ephemeral: no seq
    assert not await Notification.objects.filter(topic__name=ticks.TOPIC).aexists()
    await hub.unsubscribe(ticks.TOPIC, recorder)


def test_no_tick_before_two_snapshots():
    _forget_snapshots()
    assert charts.latest_point() is None


# --- channels and providers ------------------------------------------------------------------


def test_channels_page_shows_providers_breakers_and_attempts(staff, mail):
    text = staff.get(page_url("channels")).content.decode()
    assert "relay" in text and "console://" in text
    assert "data-breaker-state>closed<" in text
    assert "550 mailbox unavailable" not in text  # attempts show their own errors
    assert ">permanent<" in text and ">transient<" in text
    assert reverse("dashboard:delivery", args=[mail["dead"].pk]) in text
    assert reverse("events", args=["system.breakers"]) in text


def test_force_open_then_reset_change_the_breaker_and_are_published(staff, mail):
    provider = mail["provider"]
    url = reverse("dashboard:breaker", args=[provider.pk])

    response = staff.post(url, {"action": "open"}, follow=True)
    assert "breaker forced open, now forced open" in response.content.decode()
    assert BreakerState.objects.get(provider=provider).state == "forced_open"
    assert "data-breaker-state>forced open<" in response.content.decode()

    response = staff.post(url, {"action": "reset"}, follow=True)
    assert "breaker reset, now closed" in response.content.decode()
    assert BreakerState.objects.get(provider=provider).state == "closed"
    events = Notification.objects.filter(topic__name="system.breakers").order_by("seq")
    assert [n.event for n in events] == ["breaker.forced_open", "breaker.closed"]


def test_an_unknown_breaker_action_changes_nothing(staff, mail):
    url = reverse("dashboard:breaker", args=[mail["provider"].pk])
    response = staff.post(url, {"action": "disable"}, follow=True)
    assert "unknown breaker action" in response.content.decode()
    assert not BreakerState.objects.exists()


def test_breaker_actions_are_posts_only(staff, mail):
    url = reverse("dashboard:breaker", args=[mail["provider"].pk])
    assert staff.get(url).status_code == 405


# --- topics and the console ---------------------------------------------------------------------


def test_topics_page_lists_topics_with_seq_and_rate(staff, db):
    ingest([NotificationIn(topic="alerts.k8s", event="pod.crash") for _ in range(3)])
    old = Topic.objects.create(name="old.quiet")
    Notification.objects.create(
        topic=old, seq=1, event="x", created_at=timezone.now() - timedelta(hours=1)
    )
    response = staff.get(page_url("topics"))
    rows = {t.name: t for t in response.context["topics"]}
    assert rows["alerts.k8s"].last_seq == 3 and rows["alerts.k8s"].last_minute == 3
    assert rows["old.quiet"].last_minute == 0
    assert rows["alerts.k8s"].subscribers == {}  # nobody subscribed through this process
    assert rows["alerts.k8s"].present == []
    text = response.content.decode()
    assert "this server process" in text  # subscribers are per process, and it says so
    assert response.context["chosen"] == "alerts.k8s"  # the most active topic first
    assert response.context["console_events"] == ["console.test", "pod.crash"]


def test_console_publish_stores_a_test_notification_as_the_staff_user(staff, db):
    response = staff.post(
        reverse("dashboard:console-publish"),
        {"topic": "ops.console", "event": "console.test", "data": '{"note": "hi"}'},
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["topic"] == "ops.console" and body["seq"] == 1
    stored = Notification.objects.get(pk=body["id"])
    assert (stored.source, stored.event, stored.severity) == ("user", "console.test", "info")
    assert stored.data == {"note": "hi", "by": "oscar"}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"topic": "Not A Topic"}, "topic"),
        ({"topic": "ops.console", "data": "[1, 2]"}, "data"),
        ({"topic": "ops.console", "data": "{nope"}, "data"),
    ],
)
def test_console_publish_refuses_bad_input_and_stores_nothing(staff, db, data, field):
    response = staff.post(reverse("dashboard:console-publish"), data)
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not Notification.objects.exists()


def test_the_console_follows_the_chosen_topic_from_its_last_few(staff, db):
    ingest([NotificationIn(topic="ops.many", event="step") for _ in range(15)])
    response = staff.get(page_url("topics"), {"topic": "ops.many"})
    assert response.context["console_since"] == 5
    assert reverse("events", args=["ops.many"]) in response.content.decode()


# --- deliveries ---------------------------------------------------------------------------------


def test_deliveries_filter_by_status_and_channel(staff, mail):
    listed = staff.get(page_url("deliveries"), {"status": "dead"}).context["page"].object_list
    assert [d.pk for d in listed] == [mail["dead"].pk]
    other = Channel.objects.create(name="sms", kind="sms")
    query = {"channel": str(other.pk)}
    response = staff.get(page_url("deliveries"), query)
    assert list(response.context["page"].object_list) == []
    assert "No delivery matches these filters" in response.content.decode()
    query = {"channel": str(mail["channel"].pk), "status": "sent"}
    listed = staff.get(page_url("deliveries"), query).context["page"].object_list
    assert [d.pk for d in listed] == [mail["sent"].pk]


def test_a_delivery_shows_each_attempt_and_a_replay_when_dead(staff, mail):
    dead = mail["dead"]
    text = staff.get(reverse("dashboard:delivery", args=[dead.pk])).content.decode()
    assert text.count('<span class="badge transient">') == 1
    assert text.count('<span class="badge permanent">') == 1
    assert reverse("dashboard:replay", args=[dead.pk]) in text
    sent = mail["sent"]
    text = staff.get(reverse("dashboard:delivery", args=[sent.pk])).content.decode()
    assert reverse("dashboard:replay", args=[sent.pk]) not in text
    assert "No attempt yet" in text


def test_replay_puts_a_dead_delivery_back_and_keeps_its_attempts(staff, mail):
    dead = mail["dead"]
    response = staff.post(reverse("dashboard:replay", args=[dead.pk]), follow=True)
    assert f"Delivery {dead.pk} sent again." in response.content.decode()
    dead.refresh_from_db()
    assert (dead.status, dead.attempts, dead.last_error) == ("pending", 0, "")
    assert dead.attempt_rows.count() == 2


def test_replay_leaves_a_delivery_that_is_not_dead(staff, mail):
    sent = mail["sent"]
    response = staff.post(reverse("dashboard:replay", args=[sent.pk]), follow=True)
    assert "not dead: left as it is" in response.content.decode()
    sent.refresh_from_db()
    assert sent.status == "sent"


# --- alerts -------------------------------------------------------------------------------------


def test_alerts_page_shows_firing_pending_and_resolved_with_history(staff, db):
    rule = AlertRule.objects.order_by("name").first()  # one of the seeded rules
    now = timezone.now()
    Alert.objects.create(
        rule=rule,
        scope_value="mail",
        state="firing",
        value=0.25,
        fired_at=now,
        history=[{"at": now.isoformat(), "from": "pending", "to": "firing"}],
    )
    Alert.objects.create(rule=rule, scope_value="sms", state="pending", value=0.1)
    Alert.objects.create(rule=rule, state="resolved", resolved_at=now)
    response = staff.get(page_url("alerts"))
    assert [a.scope_value for a in response.context["firing"]] == ["mail"]
    assert [a.scope_value for a in response.context["pending"]] == ["sms"]
    assert len(response.context["resolved"]) == 1
    text = response.content.decode()
    assert "to: firing" in text and "Nothing is firing." not in text
    assert "No silence is active" in text


def test_adding_a_silence_records_who_and_why(staff, operator):
    rule = AlertRule.objects.order_by("name").first()
    until = (timezone.now() + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M")
    response = staff.post(
        page_url("alerts"),
        {"rule": rule.pk, "scope_value": "mail", "ends_at": until, "comment": "relay upgrade"},
        follow=True,
    )
    silence = Silence.objects.get()
    assert (silence.rule, silence.scope_value, silence.comment) == (rule, "mail", "relay upgrade")
    assert silence.created_by == operator
    assert silence.starts_at <= timezone.now() < silence.ends_at
    assert "relay upgrade" in response.content.decode()
    assert [s.pk for s in response.context["silences"]] == [silence.pk]


def test_a_silence_that_ends_before_it_starts_is_refused(staff, db):
    response = staff.post(
        page_url("alerts"),
        {"ends_at": "2020-01-01T00:00", "comment": "too late"},
    )
    assert response.status_code == 400
    assert "a silence ends after it starts" in response.content.decode()
    assert not Silence.objects.exists()
