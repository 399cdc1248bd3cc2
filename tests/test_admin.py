"""The admin: every page renders, history is read-only, models' validation reaches the forms,
and an API key's raw value is shown once while only its hash is stored."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.urls import reverse

from channels_app.models import TopicRule
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import (
    Alert,
    AlertRule,
    ApiKey,
    Attempt,
    BreakerState,
    Channel,
    Contact,
    Delivery,
    Notification,
    Provider,
    PushSubscription,
    Route,
    Silence,
    Topic,
)

READ_ONLY_MODELS = {Notification, Delivery, BreakerState, Alert, PushSubscription}
RAW_KEY_RE = re.compile(r"nk_[0-9a-f]{8}_[A-Za-z0-9_-]{20,}")


@pytest.fixture
def every_kind_of_row(admin_user, api_key):
    """One row of each model the admin shows, so every change page has something to render."""
    email = Channel.objects.create(name="mail", kind="email")
    relay = Provider.objects.create(channel=email, name="relay", url="smtp://127.0.0.1:1025")
    BreakerState.objects.create(
        provider=relay,
        state="open",
        transitions=[
            {
                "at": "2026-01-01T00:00:00+00:00",
                "from": "closed",
                "to": "open",
                "reason": "failure rate 100 % >= 5 % over 20 calls",
            }
        ],
    )
    route = Route.objects.create(name="alerts by mail", topic_pattern="alerts.#")
    route.channels.add(email)
    route.users.add(admin_user)
    Contact.objects.create(user=admin_user, phone="+4915112345678")
    PushSubscription.objects.create(
        user=admin_user,
        endpoint="https://fcm.googleapis.com/fcm/send/alice-laptop",
        p256dh="B" + "A" * 86,
        auth="A" * 22,
        user_agent="Firefox/140",
    )
    [result] = ingest([NotificationIn(topic="alerts.k8s", event="pod.crash", data={"pod": "a"})])
    notification = Notification.objects.get(pk=result.id)
    row = Delivery.objects.create(
        notification=notification, channel=email, recipient="a@example.com"
    )
    Attempt.objects.create(delivery=row, number=1, provider=relay, outcome="transient")
    Group.objects.create(name="ops")
    rule = AlertRule.objects.get(name="delivery-latency-p95")
    Alert.objects.create(
        rule=rule,
        state="firing",
        value=0.25,
        fired_at=notification.created_at,
        history=[
            {"at": "2026-01-01T00:00:00+00:00", "from": None, "to": "pending", "value": 0.2},
            {"at": "2026-01-01T00:01:00+00:00", "from": "pending", "to": "firing", "value": 0.25},
        ],
    )
    Silence.objects.create(
        rule=rule,
        ends_at=notification.created_at + timedelta(hours=1),
        created_by=admin_user,
        comment="provider maintenance",
    )
    return notification


def admin_urls(model, obj) -> dict[str, str]:
    info = (model._meta.app_label, model._meta.model_name)
    return {
        "changelist": reverse("admin:{}_{}_changelist".format(*info)),
        "add": reverse("admin:{}_{}_add".format(*info)),
        "change": reverse("admin:{}_{}_change".format(*info), args=[obj.pk]),
    }


@pytest.mark.django_db
def test_every_admin_page_renders(client, admin_user, every_kind_of_row):
    client.force_login(admin_user)
    assert client.get(reverse("admin:index")).status_code == 200
    for model in admin.site._registry:
        obj = model.objects.first()
        assert obj is not None, f"no {model.__name__} row to open"
        urls = admin_urls(model, obj)
        assert client.get(urls["changelist"]).status_code == 200, urls["changelist"]
        assert client.get(urls["change"]).status_code == 200, urls["change"]
        add_status = client.get(urls["add"]).status_code
        assert add_status == (403 if model in READ_ONLY_MODELS else 200), urls["add"]


@pytest.mark.django_db
def test_changelist_filters_and_search_render(client, admin_user, every_kind_of_row):
    client.force_login(admin_user)
    url = reverse("admin:routing_app_notification_changelist")
    page = client.get(url, {"severity": "info", "source": "api", "q": "pod.crash"})
    assert page.status_code == 200
    assert "alerts.k8s" in page.text and "pod.crash" in page.text
    topics = client.get(reverse("admin:routing_app_topic_changelist"))
    assert topics.context["cl"].result_list[0].notification_count == 1


@pytest.mark.django_db
def test_notification_cannot_be_edited_through_admin(client, admin_user, every_kind_of_row):
    client.force_login(admin_user)
    notification = every_kind_of_row
    url = admin_urls(Notification, notification)["change"]
    response = client.post(url, {"event": "rewritten", "seq": 99})
    assert response.status_code == 403
    notification.refresh_from_db()
    assert (notification.event, notification.seq) == ("pod.crash", 1)


@pytest.mark.django_db
def test_admin_requires_login(client):
    for url in (
        reverse("admin:index"),
        reverse("admin:routing_app_topic_changelist"),
        reverse("admin:routing_app_apikey_add"),
    ):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.django_db
def test_api_key_created_in_admin_shows_raw_key_once_and_stores_only_its_hash(client, admin_user):
    client.force_login(admin_user)
    response = client.post(
        reverse("admin:routing_app_apikey_add"),
        {"name": "ci-bot", "scopes": ["ingest"], "allowed_topics": "alerts.#\n", "rate": ""},
        follow=True,
    )
    assert response.status_code == 200
    shown = RAW_KEY_RE.findall(response.text)
    assert len(shown) == 1, "the raw key appears exactly once, in the success message"
    raw = shown[0]
    key = ApiKey.objects.get(name="ci-bot")
    assert key.hashed_key == hashlib.sha256(raw.encode()).hexdigest()
    assert raw.split("_")[1] == key.prefix
    assert all(raw not in str(value) for value in vars(key).values())
    assert key.scopes == ["ingest"] and key.topic_patterns() == ["alerts.#"]
    # Never again: not on the change page (nor its hash), not on the list.
    change = client.get(admin_urls(ApiKey, key)["change"])
    listing = client.get(reverse("admin:routing_app_apikey_changelist"))
    for page in (change, listing):
        assert raw not in page.text and key.hashed_key not in page.text
    assert not RAW_KEY_RE.search(change.text)


@pytest.mark.django_db
def test_revoke_action_revokes_selected_keys(client, admin_user, api_key):
    client.force_login(admin_user)
    row, _ = api_key
    response = client.post(
        reverse("admin:routing_app_apikey_changelist"),
        {"action": "revoke", "_selected_action": [row.pk]},
        follow=True,
    )
    assert "Revoked 1 API key(s)." in response.text
    row.refresh_from_db()
    assert row.revoked


def channel_form(**overrides) -> dict:
    data = {
        "name": "mail",
        "kind": "email",
        "enabled": "on",
        "options": "{}",
        "rate_limit": "100/s",
        "max_message_bytes": 65536,
        "breaker_failure_rate": 5,
        "breaker_window_s": 60,
        "breaker_minimum_calls": 20,
        "breaker_call_timeout_ms": 1000,
        "breaker_open_s": 30,
        "breaker_half_open_calls": 10,
        "breaker_half_open_success": 80,
        "breaker_slow_call_ms": 500,
        "breaker_slow_rate": 50,
        "breaker_open_max_s": 0,
        "max_attempts": 5,
        "retry_backoff_s": 2,
        "retry_backoff_max_s": 600,
        "providers-TOTAL_FORMS": 1,
        "providers-INITIAL_FORMS": 0,
        "providers-0-name": "relay",
        "providers-0-url": "smtp://127.0.0.1:1025",
        "providers-0-weight": 1,
        "providers-0-enabled": "on",
    }
    data.update(overrides)
    return data


@pytest.mark.django_db
def test_new_channel_with_provider_is_saved_from_one_form(client, admin_user):
    client.force_login(admin_user)
    response = client.post(reverse("admin:routing_app_channel_add"), channel_form())
    assert response.status_code == 302
    assert Provider.objects.get().url == "smtp://127.0.0.1:1025"


@pytest.mark.django_db
def test_admin_forms_reject_what_model_validation_rejects(client, admin_user):
    client.force_login(admin_user)
    bad_provider = client.post(
        reverse("admin:routing_app_channel_add"),
        channel_form(**{"providers-0-url": "https://not-smtp.example"}),
    )
    assert "a email provider URL starts with" in bad_provider.text
    with_password = client.post(
        reverse("admin:routing_app_channel_add"),
        channel_form(**{"providers-0-url": "smtp://mailer:hunter2@127.0.0.1:25"}),
    )
    assert "the SMTP URL holds a password" in with_password.text
    without_secret = client.post(
        reverse("admin:routing_app_channel_add"),
        channel_form(**{"providers-0-url": "smtp://mailer@127.0.0.1:25"}),
    )
    assert "name the environment variable" in without_secret.text
    bad_options = client.post(
        reverse("admin:routing_app_channel_add"), channel_form(options='{"colour": "red"}')
    )
    assert "&#x27;colour&#x27; is not an option of email" in bad_options.text
    assert not Channel.objects.exists()

    first = Channel.objects.create(name="first", kind="email")
    second = Channel.objects.create(name="second", kind="sms", backup=first)
    cycle = client.post(
        admin_urls(Channel, first)["change"],
        channel_form(name="first", backup=second.pk, **{"providers-TOTAL_FORMS": 0}),
    )
    assert "backup channels form a cycle" in cycle.text

    route = client.post(
        reverse("admin:routing_app_route_add"),
        {
            "name": "r",
            "enabled": "on",
            "topic_pattern": "alerts.#",
            "min_severity": "error",
            "channels": [first.pk],
            "addresses": "ops@example.com\nnot an address",
        },
    )
    assert "&#x27;not an address&#x27; is neither an email address" in route.text

    topic = client.post(
        reverse("admin:routing_app_topic_add"),
        {"name": "Bad Topic", "retention_count": 10, "retention_days": 1},
    )
    assert "is not valid: use lowercase segments" in topic.text
    assert not Topic.objects.exists() and not Route.objects.exists()


@pytest.mark.django_db
def test_topic_rule_positions_and_effects_are_edited_in_the_list(client, admin_user):
    client.force_login(admin_user)
    rules = list(TopicRule.objects.order_by("position", "id"))
    data = {"form-TOTAL_FORMS": len(rules), "form-INITIAL_FORMS": len(rules), "_save": "Save"}
    for index, rule in enumerate(rules):
        data[f"form-{index}-id"] = rule.pk
        data[f"form-{index}-position"] = rule.position
        data[f"form-{index}-effect"] = rule.effect
    data["form-0-position"] = 5
    data["form-0-effect"] = "deny"
    response = client.post(reverse("admin:channels_app_topicrule_changelist"), data)
    assert response.status_code == 302
    rules[0].refresh_from_db()
    assert (rules[0].position, rules[0].effect) == (5, "deny")


@pytest.mark.django_db
def test_user_admin_edits_contact_inline(client, admin_user):
    client.force_login(admin_user)
    page = client.get(reverse("admin:auth_user_change", args=[admin_user.pk]))
    assert "Contact (email and SMS)" in page.text
    assert 'name="contact-0-phone"' in page.text or 'name="contact-__prefix__-phone"' in page.text


@pytest.mark.django_db
def test_trim_action_applies_a_topics_retention(client, admin_user):
    client.force_login(admin_user)
    topic = Topic.objects.create(name="alerts.disk", retention_count=2, retention_days=0)
    ingest([NotificationIn(topic="alerts.disk", event="full") for _ in range(5)])
    response = client.post(
        reverse("admin:routing_app_topic_changelist"),
        {"action": "trim_now", "_selected_action": [topic.pk]},
        follow=True,
    )
    assert "Deleted 3 notification(s) past retention." in response.text
    assert sorted(topic.notifications.values_list("seq", flat=True)) == [4, 5]


@pytest.mark.django_db
def test_home_page_links_admin_and_api_docs(client):
    """The URL `make run` prints answers with the way in, not a 404."""
    response = client.get("/")
    assert response.status_code == 200
    assert b'href="/admin/"' in response.content and b'href="/api/v1/docs"' in response.content


@pytest.mark.django_db
def test_channel_test_send_queues_a_delivery_to_the_admin(client, admin_user, monkeypatch):
    from routing_app.delivery import dispatch

    scheduled = []
    monkeypatch.setattr(dispatch, "schedule_on_commit", lambda ids, at=None: scheduled.append(ids))
    client.force_login(admin_user)
    email = Channel.objects.create(name="mail", kind="email")
    sms = Channel.objects.create(name="text", kind="sms")
    answer = client.post(
        reverse("admin:routing_app_channel_changelist"),
        {"action": "send_test", "_selected_action": [email.pk, sms.pk]},
        follow=True,
    )
    page = answer.content.decode()
    row = Delivery.objects.get(channel=email)
    assert row.recipient == "alice@example.com" and row.notification.topic.name.startswith("system")
    assert scheduled == [[row.pk]]
    assert "test delivery" in page and "you have no phone number" in page
    assert not Delivery.objects.filter(channel=sms).exists()
