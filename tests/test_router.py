"""The router: deliveries written with the notification, realtime published only after commit."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from routing_app import router
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Channel, Contact, Delivery, Route


@pytest.fixture
def email(db):
    return Channel.objects.create(name="mail", kind="email")


@pytest.fixture
def sms(db):
    return Channel.objects.create(name="text", kind="sms")


def make_route(name, channels, **kw):
    users = kw.pop("users", [])
    groups = kw.pop("groups", [])
    route = Route.objects.create(name=name, **kw)
    route.channels.set(channels)
    route.users.set(users)
    route.groups.set(groups)
    return route


def post(topic="alerts.disk", severity="error", source="alertmanager", **kw):
    return ingest(
        [NotificationIn(topic=topic, event="disk.full", severity=severity, source=source, **kw)]
    )


@pytest.mark.django_db
def test_matching_route_creates_one_pending_delivery_per_recipient(
    email, sms, operator, subscriber
):
    Contact.objects.create(user=subscriber, phone="+4915112345678")
    team = Group.objects.create(name="oncall")
    subscriber.groups.add(team)
    make_route(
        "pager",
        [email, sms],
        topic_pattern="alerts.*",
        min_severity="warning",
        users=[operator],
        groups=[team],
        addresses="ops@example.com\n+4930123456",
    )
    post()
    got = sorted(Delivery.objects.values_list("channel__kind", "recipient", "status"))
    assert got == [
        ("email", "ops@example.com", "pending"),
        ("email", "oscar@example.com", "pending"),
        ("email", "sam@example.com", "pending"),
        ("sms", "+4915112345678", "pending"),
        ("sms", "+4930123456", "pending"),
    ]


@pytest.mark.django_db
def test_route_filters_on_severity_source_and_topic(email):
    make_route(
        "only-k8s-errors",
        [email],
        sources=["k8s"],
        topic_pattern="k8s.prod.#",
        min_severity="error",
        addresses="ops@example.com",
    )
    post(topic="k8s.prod.pod", source="k8s", severity="warning")  # too low
    post(topic="k8s.dev.pod", source="k8s", severity="critical")  # other topic
    post(topic="k8s.prod.pod", source="api", severity="critical")  # other source
    assert Delivery.objects.count() == 0
    post(topic="k8s.prod.pod", source="k8s", severity="critical")
    assert Delivery.objects.count() == 1


@pytest.mark.django_db
def test_disabled_channel_and_route_deliver_nothing(email):
    make_route("off", [email], addresses="ops@example.com", enabled=False)
    email.enabled = False
    email.save()
    make_route("on-but-channel-off", [email], addresses="ops@example.com")
    post()
    assert Delivery.objects.count() == 0


@pytest.mark.django_db
def test_recipients_given_at_ingest_are_added(email):
    make_route("mail-all", [email])
    post(recipients=["extra@example.com", "+4930111111"])
    assert list(Delivery.objects.values_list("recipient", flat=True)) == ["extra@example.com"]


@pytest.mark.django_db
def test_retried_ingest_does_not_duplicate_deliveries(email):
    make_route("mail-all", [email], addresses="ops@example.com")
    post(idempotency_key="fp-1")
    post(idempotency_key="fp-1")
    assert Delivery.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_realtime_publish_waits_for_commit_and_skips_rollback(monkeypatch):
    from django.db import transaction

    published = []
    monkeypatch.setattr(router, "_after_commit_publisher", lambda m: published.extend(m))
    with transaction.atomic():
        post(topic="a.b")
        assert published == []  # not before commit
    assert [(t, e["seq"], e["event"]) for t, e in published] == [("a.b", 1, "disk.full")]
    with pytest.raises(RuntimeError), transaction.atomic():
        post(topic="a.b")
        raise RuntimeError("roll back")
    assert len(published) == 1


def test_address_kinds():
    assert router.address_kind("https://hooks.example.com/x") == "webhook"
    assert router.address_kind("+4930123456") == "sms"
    assert router.address_kind("a@b.example") == "email"
    assert router.address_kind("nonsense") is None
