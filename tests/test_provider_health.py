"""Provider health checks and the breaker commands: an unhealthy provider is skipped by the
balancer and shown with its reason; ``manage.py breaker`` reads and changes breakers."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from limits.storage import MemoryStorage

from routing_app.delivery import breaker, health, limiter, service
from routing_app.delivery.breaker import Breakers, MemoryBreakerStore
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import BreakerState, Channel, Delivery, Provider
from tests.peers import SMTPServer
from tests.servers import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def memory_guards(monkeypatch):
    monkeypatch.setattr(breaker, "_breakers", Breakers(MemoryBreakerStore()))
    monkeypatch.setattr(limiter, "_limiter", limiter.Limiter(MemoryStorage()))


def test_a_provider_that_fails_its_check_is_unhealthy_and_skipped():
    with SMTPServer() as smtp:
        email = Channel.objects.create(name="email", kind="email")
        down = Provider.objects.create(
            channel=email, name="down", url=f"smtp://127.0.0.1:{free_port()}", weight=10
        )
        up = Provider.objects.create(channel=email, name="up", url=f"smtp://127.0.0.1:{smtp.port}")
        assert health.check_all() == {"email/down": False, "email/up": True}
        down.refresh_from_db()
        assert not down.healthy and down.health_error and down.health_checked_at
        assert BreakerState.objects.filter(provider=up, state="closed").exists()  # mirrored

        [result] = ingest([NotificationIn(topic="ops.x", event="e")])
        row = Delivery.objects.create(notification_id=result.id, channel=email, recipient="a@b.c")
        service.deliver([row.pk])
        row.refresh_from_db()
        assert row.provider == up
        assert not row.attempt_rows.filter(provider=down).exists()  # never called
        smtp.wait_for(1)


def test_breaker_command_shows_opens_and_resets_a_provider():
    email = Channel.objects.create(name="email", kind="email")
    Provider.objects.create(channel=email, name="relay", url="console://")
    out = io.StringIO()
    call_command("breaker", "open", "email/relay", stdout=out)
    assert "breaker now forced_open" in out.getvalue()
    call_command("breaker", "status", stdout=out)
    assert "email/relay" in out.getvalue() and "forced_open" in out.getvalue()
    call_command("breaker", "reset", "relay", stdout=out)
    assert "breaker now closed" in out.getvalue()
    with pytest.raises(CommandError, match="no provider 'nope'; providers: email/relay"):
        call_command("breaker", "reset", "nope")


def test_deliveries_command_replays_the_dead_of_one_channel(monkeypatch):
    from routing_app.delivery import dispatch

    scheduled = []
    monkeypatch.setattr(dispatch, "schedule_on_commit", lambda ids, at=None: scheduled.append(ids))
    email = Channel.objects.create(name="email", kind="email")
    sms = Channel.objects.create(name="sms", kind="sms")
    [result] = ingest([NotificationIn(topic="ops.x", event="e")])
    dead = [
        Delivery.objects.create(
            notification_id=result.id, channel=ch, recipient=r, status="dead", attempts=5
        )
        for ch, r in ((email, "a@b.c"), (sms, "+4915112345678"))
    ]
    out = io.StringIO()
    call_command("deliveries", "retry", "--dead", "--channel", "email", stdout=out)
    assert "1 dead delivery(s) sent again" in out.getvalue()
    statuses = {d.channel.name: Delivery.objects.get(pk=d.pk) for d in dead}
    assert (statuses["email"].status, statuses["email"].attempts) == ("pending", 0)
    assert statuses["sms"].status == "dead"
    assert scheduled == [[dead[0].pk]]
    with pytest.raises(CommandError, match="no channel named 'fax'"):
        call_command("deliveries", "retry", "--dead", "--channel", "fax")
