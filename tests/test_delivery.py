"""Outbound delivery in-process: ``service.deliver`` against real peers (an aiosmtpd server, an
HTTP receiver), with the breakers and limiter in memory and the breaker's clock in the test's
hands. Each test delivers one row at a time (the calling thread, inside the test's transaction);
the Celery worker's path is in test_delivery_worker.py."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from limits.storage import MemoryStorage
from standardwebhooks import Webhook

from routing_app.delivery import breaker, dispatch, limiter, service, sweeper
from routing_app.delivery.breaker import Breakers, MemoryBreakerStore, State
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import (
    ApiKey,
    Attempt,
    BreakerState,
    Channel,
    Contact,
    Delivery,
    Notification,
    Provider,
    Route,
)
from tests.peers import HTTPReceiver, Reply, SMTPServer, closed_port_url

pytestmark = pytest.mark.django_db
Status = Delivery.Status
Outcome = Attempt.Outcome
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes: a test secret


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Breakers and the limiter of this test alone, in memory; the breakers' clock is this."""
    c = Clock()
    monkeypatch.setattr(breaker, "_breakers", Breakers(MemoryBreakerStore(), clock=c))
    monkeypatch.setattr(limiter, "_limiter", limiter.Limiter(MemoryStorage()))
    return c


class Scheduled(list):
    """``(ids, at)`` of each hand-over to workers; ``ids()`` lists the ids alone."""

    def ids(self) -> list[list[int]]:
        return [ids for ids, _ in self]


@pytest.fixture
def scheduled(monkeypatch) -> Scheduled:
    """What the code hands to workers, at once rather than after commit (the test's transaction
    never commits); nothing is enqueued for real. The router's use of the commit is tested on
    its own (test_routed_deliveries_are_scheduled_once_the_transaction_commits)."""
    calls = Scheduled()

    def schedule(ids, at=None):
        calls.append((list(ids), at))

    monkeypatch.setattr(dispatch, "schedule", schedule)
    monkeypatch.setattr(dispatch, "schedule_on_commit", schedule)
    return calls


def channel(kind: str, name: str | None = None, **fields) -> Channel:
    return Channel.objects.create(name=name or kind, kind=kind, **fields)


def provider(ch: Channel, name: str, url: str, **fields) -> Provider:
    return Provider.objects.create(channel=ch, name=name, url=url, **fields)


def delivery(ch: Channel, recipient: str, *, event: str = "deploy.done", user=None) -> Delivery:
    [result] = ingest(
        [NotificationIn(topic="ops.deploys", event=event, data={"app": "shop", "version": "1.2"})]
    )
    return Delivery.objects.create(
        notification_id=result.id, channel=ch, recipient=recipient, user=user
    )


def deliver(row: Delivery) -> Delivery:
    service.deliver([row.pk])
    row.refresh_from_db()
    return row


def attempts(row: Delivery) -> list[tuple[str, str]]:
    return [
        (a.provider.name if a.provider else "", a.outcome)
        for a in Attempt.objects.filter(delivery=row).order_by("number")
    ]


# --- sending ----------------------------------------------------------------------------------


def test_email_reaches_the_mailbox_with_the_rendered_subject_and_both_bodies(clock, smtp_server):
    email = channel("email", options={"from_email": "alerts@notify.test"})
    provider(email, "relay", f"smtp://127.0.0.1:{smtp_server.port}")
    row = deliver(delivery(email, "sam@example.com"))

    [message] = smtp_server.wait_for(1)
    assert row.status == Status.SENT
    assert row.attempts == 1 and row.sent_at is not None and row.latency_ms is not None
    assert message["To"] == "sam@example.com"
    assert message["From"] == "alerts@notify.test"
    assert "deploy.done" in message["Subject"] and "ops.deploys" in message["Subject"]
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "shop" in text and "1.2" in text
    assert "<" in html and "shop" in html
    assert attempts(row) == [("relay", Outcome.SENT)]


def test_webhook_is_signed_so_that_standardwebhooks_verifies_it(clock, receiver, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    hook = channel("webhook")
    provider(hook, "receiver", receiver.url + "/hook", credentials_env="HOOK_SECRET")
    row = deliver(delivery(hook, "*"))

    [request] = receiver.wait_for(1)
    headers = {k.lower(): v for k, v in request.headers.items()}
    payload = Webhook(SECRET).verify(request.body, headers)
    assert payload["delivery_id"] == row.pk
    assert payload["notification"]["event"] == "deploy.done"
    assert headers["webhook-id"] == str(row.pk)
    assert row.status == Status.SENT


def test_a_batch_is_sent_in_the_same_statements_whatever_its_size(clock, receiver, monkeypatch):
    """The rows of one batch go out together: their attempts and their sent rows are written in
    a fixed number of statements (not one per row), each row and attempt with its own values."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    monkeypatch.setenv("HOOK_SECRET", SECRET)
    hook = channel("webhook")
    receiving = provider(hook, "receiver", receiver.url + "/hook", credentials_env="HOOK_SECRET")
    statements = []
    batches = []
    for size in (2, 7):
        rows = [delivery(hook, "*") for _ in range(size)]
        with CaptureQueriesContext(connection) as captured:
            service.deliver([row.pk for row in rows])
        statements.append(len(captured.captured_queries))
        batches.append(rows)
    assert statements[0] == statements[1]

    received = receiver.wait_for(9)
    assert sorted(int(r.headers["webhook-id"]) for r in received) == sorted(
        row.pk for rows in batches for row in rows
    )
    for row in (row for rows in batches for row in rows):
        row.refresh_from_db()
        assert (row.status, row.attempts, row.provider_id) == (Status.SENT, 1, receiving.pk)
        assert row.sent_at is not None and row.latency_ms is not None and row.last_error == ""
        [attempt] = Attempt.objects.filter(delivery=row)
        assert (attempt.number, attempt.outcome, attempt.http_status) == (1, Outcome.SENT, 200)
        assert attempt.duration_ms is not None


# --- failover, retries, dead letters ------------------------------------------------------------


def test_a_refused_provider_hands_over_to_the_next_in_the_same_try(clock, smtp_server):
    email = channel("email")
    provider(email, "a-down", closed_port_url("smtp"), weight=5)  # the balancer picks it first
    provider(email, "b-up", f"smtp://127.0.0.1:{smtp_server.port}")
    row = deliver(delivery(email, "sam@example.com"))

    assert row.status == Status.SENT and row.attempts == 1
    assert row.provider.name == "b-up"
    assert attempts(row) == [("a-down", Outcome.TRANSIENT), ("b-up", Outcome.SENT)]
    assert len(smtp_server.wait_for(1)) == 1


def test_a_failed_try_is_retried_later_with_backoff_then_dead(clock, scheduled):
    email = channel("email", max_attempts=2, retry_backoff_s=60)
    provider(email, "down", closed_port_url("smtp"))
    row = deliver(delivery(email, "sam@example.com"))

    assert row.status == Status.FAILED and row.attempts == 1
    assert "down" in row.last_error
    assert timezone.now() <= row.next_attempt_at <= timezone.now() + timedelta(seconds=61)
    assert service.deliver([row.pk]) == []  # not due yet: not claimed

    Delivery.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    row = deliver(row)
    assert row.status == Status.DEAD and row.attempts == 2
    assert attempts(row) == [("down", Outcome.TRANSIENT)] * 2


@pytest.mark.django_db(transaction=True)  # the API reads keys on its own database thread
def test_a_400_is_dead_at_once_and_a_replay_after_the_fix_succeeds(
    clock, receiver, client, scheduled
):
    hook = channel("webhook")
    provider(hook, "receiver", receiver.url)
    receiver.program(Reply(400, b'{"error": "unknown field"}'))
    row = deliver(delivery(hook, "*"))

    assert row.status == Status.DEAD and row.attempts == 1
    assert "400" in row.last_error and "unknown field" in row.last_error
    assert attempts(row) == [("receiver", Outcome.PERMANENT)]

    key = ApiKey(name="ops", scopes=["deliveries"])
    raw = key.set_new_key()
    key.save()
    answer = client.post(
        f"/api/v1/deliveries/{row.pk}/retry", headers={"authorization": f"Bearer {raw}"}
    )
    assert answer.status_code == 202, answer.content
    assert answer.json() == {"id": row.pk, "status": "pending"}
    row = deliver(row)  # the worker's part (the enqueue after commit is captured here)
    assert row.status == Status.SENT
    assert [o for _, o in attempts(row)] == [Outcome.PERMANENT, Outcome.SENT]
    again = client.post(
        f"/api/v1/deliveries/{row.pk}/retry", headers={"authorization": f"Bearer {raw}"}
    )
    assert again.status_code == 409 and "only a dead one" in again.json()["detail"]


def test_a_replay_from_admin_sends_the_dead_delivery_again(clock, receiver, admin_client):
    hook = channel("webhook")
    provider(hook, "receiver", receiver.url)
    receiver.program(Reply(422))
    row = deliver(delivery(hook, "*"))
    assert row.status == Status.DEAD

    answer = admin_client.post(
        "/admin/routing_app/delivery/",
        {"action": "retry_now", "_selected_action": [row.pk]},
        follow=True,
    )
    assert "1 dead delivery(s) sent again" in answer.content.decode()
    assert deliver(row).status == Status.SENT


def test_a_410_kills_the_delivery_and_disables_the_provider(clock, receiver):
    hook = channel("webhook")
    gone = provider(hook, "receiver", receiver.url)
    receiver.program(Reply(410))
    row = deliver(delivery(hook, "*"))
    gone.refresh_from_db()
    assert row.status == Status.DEAD
    assert not gone.enabled and "410" in gone.disabled_reason


def test_a_429_with_retry_after_makes_the_next_try_wait_that_long(clock, receiver, scheduled):
    hook = channel("webhook", retry_backoff_s=1)
    provider(hook, "receiver", receiver.url)
    receiver.program(Reply(429, headers={"Retry-After": "120"}))
    before = timezone.now()
    row = deliver(delivery(hook, "*"))

    assert row.status == Status.FAILED
    assert row.next_attempt_at >= before + timedelta(seconds=120)
    assert attempts(row) == [("receiver", Outcome.TRANSIENT)]
    assert Attempt.objects.get(delivery=row).http_status == 429


def test_a_hung_provider_is_cut_at_the_call_timeout_and_the_next_takes_over(clock, receiver):
    hook = channel("webhook", breaker_call_timeout_ms=300)
    with HTTPReceiver(default=Reply(delay_s=30)) as hung:
        provider(hook, "hung", hung.url, weight=5)
        provider(hook, "fine", receiver.url)
        row = deliver(delivery(hook, "*"))
    assert row.status == Status.SENT and row.provider.name == "fine"
    assert attempts(row) == [("hung", Outcome.TIMEOUT), ("fine", Outcome.SENT)]


# --- the breaker in the path --------------------------------------------------------------------


def test_the_breaker_opens_after_the_minimum_calls_and_closes_after_the_trials(clock, smtp_server):
    email = channel(
        "email",
        breaker_minimum_calls=4,
        breaker_failure_rate=50,
        breaker_open_s=30,
        breaker_half_open_calls=2,
        breaker_half_open_success=100,
    )
    flaky_smtp = SMTPServer()  # not started yet: A refuses connections
    a = provider(email, "a", f"smtp://127.0.0.1:{flaky_smtp.port}", weight=100)
    provider(email, "b", f"smtp://127.0.0.1:{smtp_server.port}")
    rows = [deliver(delivery(email, f"user{i}@example.com")) for i in range(6)]

    assert all(r.status == Status.SENT and r.provider.name == "b" for r in rows)
    # a was called until its breaker opened (4 calls, all failed), then skipped
    a_calls = Attempt.objects.filter(provider=a).values_list("outcome", flat=True)
    assert list(a_calls) == [Outcome.TRANSIENT] * 4
    mirror = BreakerState.objects.get(provider=a)
    assert mirror.state == State.OPEN and mirror.failure_rate == 100.0
    assert mirror.transitions[0]["to"] == "open"
    opened = Notification.objects.get(topic__name="system.breakers", event="breaker.opened")
    assert opened.data["provider"] == "a" and opened.data["channel"] == "email"

    with flaky_smtp:
        clock.now += 31  # the open period is over: the next calls are A's trials
        more = [deliver(delivery(email, f"later{i}@example.com")) for i in range(2)]
        assert [r.provider.name for r in more] == ["a", "a"]
        assert len(flaky_smtp.wait_for(2)) == 2
    assert BreakerState.objects.get(provider=a).state == State.CLOSED
    events = Notification.objects.filter(topic__name="system.breakers").order_by("seq")
    assert [n.event for n in events] == ["breaker.opened", "breaker.half_open", "breaker.closed"]
    # every delivery exactly once, in one mailbox or the other
    received = [m["To"] for m in smtp_server.wait_for(6) + flaky_smtp.wait_for(2)]
    assert sorted(received) == sorted(r.recipient for r in rows + more)


def test_a_forced_open_provider_is_skipped_until_reset(clock, smtp_server, django_user_model):
    from routing_app.delivery import transitions

    email = channel("email")
    a = provider(email, "a", f"smtp://127.0.0.1:{smtp_server.port}", weight=100)
    b = provider(email, "b", f"smtp://127.0.0.1:{smtp_server.port}")
    assert transitions.control(a, "open").state == State.FORCED_OPEN
    assert deliver(delivery(email, "x@example.com")).provider == b
    assert transitions.control(a, "reset").state == State.CLOSED
    assert deliver(delivery(email, "y@example.com")).provider == a


# --- failover to the backup channel -------------------------------------------------------------


def test_both_providers_down_fails_over_to_the_backup_channel(
    clock, smtp_server, django_user_model, scheduled
):
    sam = django_user_model.objects.create_user("sam", "sam@example.com")
    Contact.objects.create(user=sam, phone="+4915112345678")
    email_backup = channel("email", "email-backup")
    provider(email_backup, "relay", f"smtp://127.0.0.1:{smtp_server.port}")
    sms = channel(
        "sms", max_attempts=1, backup=email_backup, options={"from_number": "+15005550006"}
    )
    for name in ("gw-a", "gw-b"):
        provider(sms, name, closed_port_url("http") + "/2010-04-01/Accounts/AC1/Messages.json")
    row = deliver(delivery(sms, "+4915112345678", user=sam))

    assert row.status == Status.DEAD
    assert {o for _, o in attempts(row)} == {Outcome.TRANSIENT}
    backup = Delivery.objects.get(failover_from=row)
    assert backup.channel == email_backup and backup.recipient == "sam@example.com"
    assert [backup.pk] in scheduled.ids()
    assert deliver(backup).status == Status.SENT
    assert smtp_server.wait_for(1)[0]["To"] == "sam@example.com"


def test_no_callable_provider_fails_over_at_once_without_calling(clock, smtp_server, scheduled):
    from routing_app.delivery import transitions

    backup = channel("email", "email-backup")
    provider(backup, "relay", f"smtp://127.0.0.1:{smtp_server.port}")
    primary = channel("email", "email-primary", backup=backup)
    only = provider(primary, "only", f"smtp://127.0.0.1:{smtp_server.port}")
    transitions.control(only, "open")
    row = deliver(delivery(primary, "sam@example.com"))

    assert row.status == Status.DEAD and "forced_open" in row.last_error
    assert attempts(row) == [("only", Outcome.BREAKER_OPEN)]
    assert Delivery.objects.get(failover_from=row).channel == backup


def test_no_callable_provider_and_no_backup_waits_without_counting_a_try(clock, scheduled):
    from routing_app.delivery import transitions

    email = channel("email")
    only = provider(email, "only", closed_port_url("smtp"))
    transitions.control(only, "open")
    row = deliver(delivery(email, "sam@example.com"))
    assert row.status == Status.FAILED and row.attempts == 0
    assert "no provider may be called" in row.last_error
    assert row.next_attempt_at > timezone.now()


# --- the limiter ------------------------------------------------------------------------------


def test_over_the_channel_limit_a_delivery_waits_and_is_not_dropped(clock, smtp_server, scheduled):
    email = channel("email", rate_limit="2/m")
    provider(email, "relay", f"smtp://127.0.0.1:{smtp_server.port}")
    rows = [deliver(delivery(email, f"u{i}@example.com")) for i in range(3)]

    assert [r.status for r in rows] == [Status.SENT, Status.SENT, Status.PENDING]
    waiting = rows[2]
    assert waiting.attempts == 0 and waiting.last_error == ""
    assert timezone.now() < waiting.next_attempt_at <= timezone.now() + timedelta(seconds=61)
    assert attempts(waiting) == [("relay", Outcome.RATE_LIMITED)]
    assert ([waiting.pk], waiting.next_attempt_at) in scheduled  # to run when the window has room
    assert len(smtp_server.wait_for(2)) == 2


def test_over_the_provider_limit_a_delivery_waits_too(clock, receiver, scheduled):
    hook = channel("webhook")
    provider(hook, "receiver", receiver.url, rate_limit="1/h")
    first, second = (deliver(delivery(hook, "*")) for _ in range(2))
    assert (first.status, second.status) == (Status.SENT, Status.PENDING)
    assert second.next_attempt_at > timezone.now() + timedelta(minutes=1)  # the hour's window
    assert attempts(second) == [("receiver", Outcome.RATE_LIMITED)]


class CountingStore(MemoryBreakerStore):
    """A memory breaker store that counts its plain reads and its counts of results."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        self.counts = 0

    def load(self, provider_id, *, window=True):
        self.loads += 1
        return super().load(provider_id, window=window)

    def add_calls(self, *args, **kwargs):
        self.counts += 1
        return super().add_calls(*args, **kwargs)

    def add_call(self, *args, **kwargs):
        self.counts += 1
        return super().add_call(*args, **kwargs)


def config_of(ch: Channel) -> breaker.BreakerConfig:
    return breaker.BreakerConfig.for_channel(ch)


def counted_hits(monkeypatch) -> list:
    """The limiter's window hits from now on: ``(key, cost)`` each."""
    hits = []
    strategy = limiter.limiter()._strategy
    original = strategy.hit

    def hit(item, *identifiers, cost=1):
        hits.append((identifiers[0], cost))
        return original(item, *identifiers, cost=cost)

    monkeypatch.setattr(strategy, "hit", hit)
    return hits


def test_a_batch_reads_and_counts_each_breaker_once_and_asks_each_window_once(
    clock, receiver, monkeypatch
):
    store = CountingStore()
    monkeypatch.setattr(breaker, "_breakers", Breakers(store, clock=clock))
    hook = channel("webhook", rate_limit="100/m")
    receiving = provider(hook, "receiver", receiver.url, rate_limit="100/m")
    rows = [delivery(hook, "*") for _ in range(5)]
    hits = counted_hits(monkeypatch)

    service.deliver([row.pk for row in rows])

    assert (store.loads, store.counts) == (1, 1)
    assert BreakerState.objects.filter(provider=receiving).count() == 0  # closed all along
    assert breaker.breakers_from_settings().snapshot(receiving.pk, config_of(hook)).calls == 5
    assert hits == [(f"channel:{hook.pk}", 5), (f"provider:{receiving.pk}", 5)]
    assert len(receiver.wait_for(5)) == 5
    assert {r.status for r in Delivery.objects.filter(pk__in=[r.pk for r in rows])} == {Status.SENT}
    # the slots taken are those of five calls, one after the other
    assert not limiter.limiter().take(f"channel:{hook.pk}", "100/m", 96)
    assert limiter.limiter().take(f"channel:{hook.pk}", "100/m", 95)


def test_a_batch_larger_than_the_window_sends_what_fits_and_the_rest_waits(
    clock, receiver, scheduled
):
    hook = channel("webhook", rate_limit="3/m")
    provider(hook, "receiver", receiver.url)
    rows = [delivery(hook, "*") for _ in range(5)]

    service.deliver([row.pk for row in rows])

    for row in rows:
        row.refresh_from_db()
    assert [r.status for r in rows].count(Status.SENT) == 3
    waiting = [r for r in rows if r.status != Status.SENT]
    assert [r.status for r in waiting] == [Status.PENDING] * 2
    for row in waiting:
        assert row.attempts == 0 and row.next_attempt_at > timezone.now()
        assert attempts(row) == [("receiver", Outcome.RATE_LIMITED)]
        assert ([row.pk], row.next_attempt_at) in scheduled
    assert len(receiver.wait_for(3)) == 3


def test_a_batch_gives_a_half_open_breaker_exactly_its_trials(clock, receiver):
    hook = channel(
        "webhook",
        breaker_minimum_calls=2,
        breaker_failure_rate=50,
        breaker_open_s=30,
        breaker_half_open_calls=2,
    )
    a = provider(hook, "a", receiver.url + "/a", weight=100)
    provider(hook, "b", receiver.url + "/b")
    breakers, config = breaker.breakers_from_settings(), breaker.BreakerConfig.for_channel(hook)
    for _ in range(2):
        permit, _ = breakers.acquire(a.pk, config)
        breakers.record(permit, config, success=False, duration_ms=1)
    assert breakers.snapshot(a.pk, config).state == State.OPEN
    clock.now += 31  # the open period is over: the next acquire half-opens
    rows = [delivery(hook, "*") for _ in range(5)]

    service.deliver([row.pk for row in rows])

    for row in rows:
        row.refresh_from_db()
    assert sorted(r.provider.name for r in rows) == ["a", "a", "b", "b", "b"]
    assert all(r.status == Status.SENT for r in rows)
    assert breakers.snapshot(a.pk, config).state == State.CLOSED
    paths = sorted(r.path for r in receiver.wait_for(5))
    assert paths == ["/a", "/a", "/b", "/b", "/b"]


# --- claim and sweep -----------------------------------------------------------------------------


def test_a_row_is_claimed_once(clock, receiver):
    hook = channel("webhook")
    provider(hook, "receiver", receiver.url)
    row = delivery(hook, "*")
    assert [r.pk for r in service.claim([row.pk])] == [row.pk]
    assert service.claim([row.pk]) == []  # a redelivered task finds it taken
    assert service.deliver([row.pk]) == []


def test_the_sweeper_puts_back_rows_a_dead_worker_left_sending(clock, scheduled):
    email = channel("email", breaker_call_timeout_ms=1000)
    provider(email, "relay", closed_port_url("smtp"))
    row = delivery(email, "sam@example.com")
    service.claim([row.pk])
    Attempt.objects.create(delivery=row, number=1)
    long_ago = timezone.now() - timedelta(minutes=5)
    Delivery.objects.filter(pk=row.pk).update(updated_at=long_ago)

    result = sweeper.sweep()
    row.refresh_from_db()
    assert result.reset == 1 and row.status == Status.FAILED
    assert Attempt.objects.get(delivery=row).outcome == Outcome.TIMEOUT
    assert scheduled.ids() == [[row.pk]]  # due at once, enqueued once


def test_the_sweeper_enqueues_due_rows_whose_task_was_lost_once_per_grace_period(clock, scheduled):
    email = channel("email")
    fresh = delivery(email, "new@example.com")
    lost = delivery(email, "lost@example.com")
    due = delivery(email, "due@example.com")
    later = delivery(email, "later@example.com")
    minute_ago = timezone.now() - timedelta(minutes=1)
    Delivery.objects.filter(pk=lost.pk).update(updated_at=minute_ago)
    Delivery.objects.filter(pk=due.pk).update(
        status=Status.FAILED, next_attempt_at=timezone.now(), updated_at=minute_ago
    )
    Delivery.objects.filter(pk=later.pk).update(
        status=Status.FAILED,
        next_attempt_at=timezone.now() + timedelta(hours=1),
        updated_at=minute_ago,
    )
    sweeper.sweep()
    # the fresh one's task is still on its way; the later one is not due
    assert [sorted(ids) for ids in scheduled.ids()] == [sorted([lost.pk, due.pk])]
    assert fresh.pk not in scheduled.ids()[0]
    sweeper.sweep()  # within the grace period: not enqueued again
    assert len(scheduled) == 1


# --- the router hands rows over after commit ----------------------------------------------------


def test_routed_deliveries_are_scheduled_once_the_transaction_commits(
    django_capture_on_commit_callbacks, monkeypatch, django_user_model
):
    scheduled = []
    monkeypatch.setattr(dispatch, "schedule", lambda ids, at=None: scheduled.append(ids))
    email = channel("email")
    route = Route.objects.create(name="deploys", topic_pattern="ops.#")
    route.channels.set([email])
    route.users.set([django_user_model.objects.create_user("sam", "sam@example.com")])
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        ingest([NotificationIn(topic="ops.deploys", event="deploy.done")])
    assert scheduled == []  # nothing before the commit
    for callback in callbacks:
        callback()
    [row] = Delivery.objects.all()
    assert scheduled == [[row.pk]]


def test_waits_longer_than_a_countdown_are_left_to_the_sweeper(monkeypatch, settings):
    from routing_app.delivery import tasks

    sent = []
    monkeypatch.setattr(
        tasks.deliver, "apply_async", lambda args, countdown: sent.append((args, countdown))
    )
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"  # the Celery path
    settings.DELIVERY_BATCH = 2
    soon = timezone.now() + timedelta(seconds=30)
    dispatch.schedule([1, 2, 3], at=soon)
    assert [args for args, _ in sent] == [([1, 2],), ([3],)]
    assert all(25 < countdown <= 30 for _, countdown in sent)
    sent.clear()
    dispatch.schedule(
        [4], at=timezone.now() + timedelta(seconds=settings.DELIVERY_MAX_COUNTDOWN_S + 5)
    )
    assert sent == []


# --- API --------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_api_lists_deliveries_and_shows_a_notification_with_its_attempts(clock, receiver, client):
    hook = channel("webhook")
    provider(hook, "receiver", receiver.url)
    receiver.program(Reply(503))
    row = deliver(delivery(hook, "*"))
    key = ApiKey(name="ops", scopes=["deliveries"])
    auth = {"authorization": f"Bearer {key.set_new_key()}"}
    key.save()

    listed = client.get("/api/v1/deliveries?status=failed&channel=webhook", headers=auth).json()
    assert [d["id"] for d in listed["deliveries"]] == [row.pk]
    assert listed["deliveries"][0]["status"] == "failed"
    assert client.get("/api/v1/deliveries?status=sent", headers=auth).json()["deliveries"] == []
    detail = client.get(f"/api/v1/notifications/{row.notification_id}", headers=auth).json()
    [shown] = detail["deliveries"]
    assert detail["notification"]["event"] == "deploy.done"
    assert [(a["outcome"], a["http_status"]) for a in shown["attempt_log"]] == [("transient", 503)]
    bad = client.get("/api/v1/deliveries?status=lost", headers=auth)
    assert bad.status_code == 400 and bad.json()["errors"][0]["loc"] == ["query", "status"]


@pytest.mark.django_db(transaction=True)
def test_api_deliveries_need_a_key_with_the_deliveries_scope(client):
    key = ApiKey(name="ingest-only", scopes=["ingest"])
    auth = {"authorization": f"Bearer {key.set_new_key()}"}
    key.save()
    assert client.get("/api/v1/deliveries").status_code == 401
    answer = client.get("/api/v1/deliveries", headers=auth)
    assert answer.status_code == 403 and "deliveries" in answer.json()["detail"]


def test_openapi_schema_lists_the_delivery_operations(client):
    paths = json.loads(client.get("/api/v1/openapi.json").content)["paths"]
    for path in (
        "/api/v1/deliveries",
        "/api/v1/deliveries/{delivery_id}/retry",
        "/api/v1/notifications/{notification_id}",
        "/api/v1/providers/{provider_id}/receipts",
    ):
        assert path in paths


def test_a_broker_outage_costs_one_failed_publish_then_the_sweeper_takes_over(
    monkeypatch, settings
):
    from routing_app.delivery import tasks

    attempts = []

    def refuse(args, countdown):
        attempts.append(args)
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(tasks.deliver, "apply_async", refuse)
    monkeypatch.setattr(dispatch, "_broker_down_until", 0.0)
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"  # the Celery path
    dispatch.schedule([1])
    dispatch.schedule([2])  # within the pause: not tried, left to the sweeper
    assert attempts == [([1],)]
    monkeypatch.setattr(dispatch, "_broker_down_until", 0.0)  # the pause is over
    dispatch.schedule([3])
    assert attempts == [([1],), ([3],)]
