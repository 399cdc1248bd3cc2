"""Web Push end to end on the server side: a routed user gets one delivery per browser
subscription, and the push transport's request, as a push service stand-in (tests/peers.py's
HTTP receiver on 127.0.0.1) records it, carries a valid VAPID JWT and an aes128gcm body that
the subscription's private key decrypts to the expected message. The push service's answers:
404/410 remove the subscription (the delivery is dead), 429 and 5xx are retried."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import http_ece
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.management import call_command
from django.utils import timezone

from routing_app.delivery import service
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import (
    Attempt,
    Channel,
    Delivery,
    Notification,
    Provider,
    PushSubscription,
    Route,
    Topic,
)
from routing_app.push import vapid
from tests.peers import Reply

pytestmark = pytest.mark.django_db

SUBJECT = "mailto:ops@notify.example"
CRASHLOOP = {"namespace": "prod", "pod": "api-7d9f", "reason": "CrashLoopBackOff"}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Browser:
    """A browser's side of a subscription: its P-256 key pair and auth secret."""

    private_key: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def new(cls) -> Browser:
        return cls(ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    @property
    def p256dh(self) -> str:
        point = self.private_key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )
        return b64url(point)

    def subscribe(self, user, endpoint: str) -> PushSubscription:
        return PushSubscription.objects.create(
            user=user, endpoint=endpoint, p256dh=self.p256dh, auth=b64url(self.auth)
        )

    def decrypt(self, body: bytes) -> dict:
        plain = http_ece.decrypt(
            body, private_key=self.private_key, auth_secret=self.auth, version="aes128gcm"
        )
        return json.loads(plain)


@pytest.fixture
def vapid_keys(settings) -> str:
    """A fresh VAPID pair in settings; returns the public key."""
    private, public = vapid.generate_keys()
    settings.WEBPUSH_VAPID_PRIVATE_KEY = private
    settings.WEBPUSH_VAPID_PUBLIC_KEY = public
    settings.WEBPUSH_VAPID_SUBJECT = SUBJECT
    return public


@pytest.fixture
def push_channel(db) -> Channel:
    channel = Channel.objects.create(
        name="browsers", kind="push", options={"ttl": 600}, max_attempts=3
    )
    Provider.objects.create(channel=channel, name="vapid", url="webpush://")
    return channel


def push_delivery(channel: Channel, user, endpoint: str, severity: str = "error") -> Delivery:
    topic = Topic.objects.create(name="alerts.k8s")
    notification = Notification.objects.create(
        topic=topic,
        seq=7,
        source="k8s",
        event="pod.crashloop",
        severity=severity,
        data={**CRASHLOOP, "url": "/pods/api-7d9f"},
    )
    return Delivery.objects.create(
        notification=notification, channel=channel, recipient=endpoint, user=user
    )


def verify_vapid(authorization: str, endpoint_origin: str, public_key: str) -> dict:
    """The claims of ``Authorization: vapid t=<JWT>, k=<key>`` once its ES256 signature is
    verified with ``k``, which must be ``public_key``; AssertionError otherwise."""
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid"
    parts = dict(item.strip().split("=", 1) for item in params.split(","))
    assert parts["k"] == public_key
    header_b64, claims_b64, signature_b64 = parts["t"].split(".")
    assert json.loads(unb64url(header_b64)) == {"typ": "JWT", "alg": "ES256"}
    signature = unb64url(signature_b64)
    assert len(signature) == 64  # JWS ES256: r and s, 32 bytes each
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(parts["k"]))
    key.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    claims = json.loads(unb64url(claims_b64))
    assert claims["aud"] == endpoint_origin
    return claims


def test_push_request_is_vapid_signed_and_decrypts_to_the_message(
    vapid_keys, push_channel, receiver, subscriber
):
    receiver.program(Reply(201, headers={"Location": f"{receiver.url}/message/1"}))
    browser = Browser.new()
    subscription = browser.subscribe(subscriber, f"{receiver.url}/push/sam-laptop")
    delivery = push_delivery(push_channel, subscriber, subscription.endpoint)

    service.deliver([delivery.pk])

    [request] = receiver.wait_for(1)
    assert request.method == "POST"
    assert request.path == "/push/sam-laptop"
    headers = {name.lower(): value for name, value in request.headers.items()}
    claims = verify_vapid(headers["authorization"], receiver.url, vapid_keys)
    assert claims["sub"] == SUBJECT
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    assert headers["content-encoding"] == "aes128gcm"
    assert headers["ttl"] == "600"  # the channel's option
    assert headers["urgency"] == "high"  # severity error
    notification = delivery.notification
    message = browser.decrypt(request.body)
    # The body lists the data's items in the order the database keeps them (jsonb's own).
    assert sorted(message.pop("body").split(", ")) == [
        "namespace: prod",
        "pod: api-7d9f",
        "reason: CrashLoopBackOff",
        "url: /pods/api-7d9f",
    ]
    assert message == {
        "title": "[ERROR] pod.crashloop on alerts.k8s",
        "url": "/pods/api-7d9f",
        "topic": "alerts.k8s",
        "seq": 7,
        "id": str(notification.id),
        "event": "pod.crashloop",
        "severity": "error",
    }
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.SENT
    assert delivery.provider_message_id == f"{receiver.url}/message/1"
    subscription.refresh_from_db()
    assert subscription.last_success_at is not None


def test_urgency_follows_severity_and_ttl_defaults_to_the_setting(
    vapid_keys, push_channel, receiver, subscriber, settings
):
    settings.WEBPUSH_TTL_S = 3600
    push_channel.options = {}
    push_channel.save()
    delivery = push_delivery(
        push_channel,
        subscriber,
        Browser.new().subscribe(subscriber, f"{receiver.url}/p").endpoint,
        severity="info",
    )

    service.deliver([delivery.pk])

    [request] = receiver.wait_for(1)
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert (headers["urgency"], headers["ttl"]) == ("low", "3600")


@pytest.mark.parametrize("status", [404, 410])
def test_a_gone_subscription_is_removed_and_its_delivery_is_dead(
    vapid_keys, push_channel, receiver, subscriber, status
):
    receiver.program(Reply(status, b"push subscription has unsubscribed or expired"))
    subscription = Browser.new().subscribe(subscriber, f"{receiver.url}/push/old-phone")
    delivery = push_delivery(push_channel, subscriber, subscription.endpoint)

    service.deliver([delivery.pk])

    receiver.wait_for(1)
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.DEAD
    assert "subscription is gone" in delivery.last_error
    [attempt] = Attempt.objects.filter(delivery=delivery)
    assert (attempt.outcome, attempt.http_status) == (Attempt.Outcome.PERMANENT, status)
    assert not PushSubscription.objects.filter(pk=subscription.pk).exists()
    assert Provider.objects.get(channel=push_channel).enabled  # the push provider stays


@pytest.mark.parametrize(
    ("reply", "at_least_s"),
    [(Reply(429, headers={"Retry-After": "120"}), 120), (Reply(500, b"try later"), 0)],
)
def test_too_many_requests_and_server_errors_are_retried(
    vapid_keys, push_channel, receiver, subscriber, reply, at_least_s
):
    receiver.program(reply, Reply(201))
    subscription = Browser.new().subscribe(subscriber, f"{receiver.url}/push/tablet")
    delivery = push_delivery(push_channel, subscriber, subscription.endpoint)

    service.deliver([delivery.pk])

    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.FAILED
    assert delivery.next_attempt_at >= timezone.now() + timedelta(seconds=at_least_s - 5)
    [attempt] = Attempt.objects.filter(delivery=delivery)
    assert (attempt.outcome, attempt.http_status) == (Attempt.Outcome.TRANSIENT, reply.status)
    subscription.refresh_from_db()
    assert str(reply.status) in subscription.last_error

    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    service.deliver([delivery.pk])

    receiver.wait_for(2)
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.SENT
    assert PushSubscription.objects.filter(pk=subscription.pk).exists()


def test_without_vapid_keys_the_provider_is_unhealthy_and_a_push_is_dead(
    push_channel, receiver, subscriber, settings
):
    settings.WEBPUSH_VAPID_PRIVATE_KEY = settings.WEBPUSH_VAPID_PUBLIC_KEY = ""
    subscription = Browser.new().subscribe(subscriber, f"{receiver.url}/push/x")
    delivery = push_delivery(push_channel, subscriber, subscription.endpoint)
    from routing_app.delivery.transports import DeliveryError, transport_for

    with pytest.raises(DeliveryError, match="WEBPUSH_VAPID_PRIVATE_KEY"):
        transport_for("push").check_health(push_channel.providers.get(), timeout_s=1)

    service.deliver([delivery.pk])

    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.DEAD
    assert "python manage.py push keys" in delivery.last_error
    assert receiver.requests.items == []


def test_a_routed_user_gets_one_delivery_per_subscription(push_channel, subscriber, outsider):
    Browser.new().subscribe(subscriber, "https://fcm.googleapis.com/fcm/send/sam-phone")
    Browser.new().subscribe(subscriber, "https://updates.push.services.mozilla.com/wpush/v2/sam")
    route = Route.objects.create(name="pods", topic_pattern="k8s.#")
    route.channels.set([push_channel])
    route.users.set([subscriber, outsider])  # Olga has no browser subscribed

    ingest([NotificationIn(topic="k8s.prod", event="pod.crashloop", source="k8s")])

    assert sorted(Delivery.objects.values_list("recipient", "user__username")) == [
        ("https://fcm.googleapis.com/fcm/send/sam-phone", "sam"),
        ("https://updates.push.services.mozilla.com/wpush/v2/sam", "sam"),
    ]


def test_a_test_send_goes_to_the_newest_subscription(push_channel, subscriber):
    with pytest.raises(ValueError, match="no push subscription"):
        service.send_test(push_channel, subscriber)
    Browser.new().subscribe(subscriber, "https://fcm.googleapis.com/fcm/send/old")
    newest = Browser.new().subscribe(subscriber, "https://fcm.googleapis.com/fcm/send/new")

    row = service.send_test(push_channel, subscriber)

    assert (row.recipient, row.user) == (newest.endpoint, subscriber)


def test_a_subscription_removed_after_routing_makes_the_delivery_dead(
    vapid_keys, push_channel, receiver, subscriber
):
    subscription = Browser.new().subscribe(subscriber, f"{receiver.url}/push/gone")
    delivery = push_delivery(push_channel, subscriber, subscription.endpoint)
    subscription.delete()

    service.deliver([delivery.pk])

    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.DEAD
    assert "subscription was removed" in delivery.last_error
    assert receiver.requests.items == []


def test_a_browser_another_user_subscribed_since_gets_no_push_of_the_first(
    vapid_keys, push_channel, receiver, subscriber, outsider
):
    subscription = Browser.new().subscribe(subscriber, f"{receiver.url}/push/shared-laptop")
    delivery = push_delivery(push_channel, subscriber, subscription.endpoint)
    PushSubscription.objects.filter(pk=subscription.pk).update(user=outsider)

    service.deliver([delivery.pk])

    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.DEAD
    assert "belongs to another user" in delivery.last_error
    assert receiver.requests.items == []
    assert PushSubscription.objects.get(pk=subscription.pk).last_error == ""  # Olga's is fine


def test_a_long_message_is_cut_to_what_push_services_take():
    from routing_app.delivery.transports.push import PAYLOAD_MAX_BYTES, payload

    n = Notification(
        topic=Topic(name="alerts.k8s"), seq=1, event="log.line", data={"line": "é" * 5000}
    )
    message = payload(Delivery(notification=n, channel=Channel(name="b", kind="push")))

    assert PAYLOAD_MAX_BYTES - 3 <= len(message) <= PAYLOAD_MAX_BYTES  # "é" is 2 bytes
    body = json.loads(message)["body"]
    assert body.startswith("line: éé") and body.endswith("é…")


def test_push_keys_command_prints_a_pair_that_signs(capsys, settings):
    call_command("push", "keys")
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line)
    settings.WEBPUSH_VAPID_PRIVATE_KEY = lines["WEBPUSH_VAPID_PRIVATE_KEY"]
    settings.WEBPUSH_VAPID_PUBLIC_KEY = lines["WEBPUSH_VAPID_PUBLIC_KEY"]
    assert len(unb64url(lines["WEBPUSH_VAPID_PUBLIC_KEY"])) == 65  # applicationServerKey
    header = vapid.authorization("https://push.example.net/send/1")["Authorization"]
    claims = verify_vapid(header, "https://push.example.net", lines["WEBPUSH_VAPID_PUBLIC_KEY"])
    assert claims["sub"] == settings.WEBPUSH_VAPID_SUBJECT
