"""Delivery receipts: an SMS gateway's signed status callback moves a sent delivery to
delivered (or dead, failing it over); django-anymail's tracking signal does the same for email.
The signature in these tests is computed here, independently of the code under test."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from anymail.signals import AnymailTrackingEvent, tracking
from django.utils import timezone

from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Channel, Delivery, Provider

pytestmark = pytest.mark.django_db(transaction=True)  # the endpoint works on a database thread
TOKEN = "twilio-auth-token"
Status = Delivery.Status


def sign(url: str, params: dict[str, str]) -> str:
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(TOKEN.encode(), data.encode(), hashlib.sha1).digest()).decode()


@pytest.fixture
def sent_sms(monkeypatch):
    monkeypatch.setenv("TWILIO_TOKEN", TOKEN)
    backup = Channel.objects.create(name="mail", kind="email")
    sms = Channel.objects.create(name="sms", kind="sms", backup=backup)
    gateway = Provider.objects.create(
        channel=sms,
        name="twilio",
        url="https://api.twilio.test/2010-04-01/Accounts/AC1/Messages.json",
        credentials_env="TWILIO_TOKEN",
    )
    [result] = ingest([NotificationIn(topic="ops.deploys", event="deploy.done")])
    return Delivery.objects.create(
        notification_id=result.id,
        channel=sms,
        recipient="+4915112345678",
        status=Status.SENT,
        provider=gateway,
        provider_message_id="SM123",
        sent_at=timezone.now(),
    )


def post_receipt(client, delivery: Delivery, params: dict[str, str], signature: str | None = None):
    path = f"/api/v1/providers/{delivery.provider_id}/receipts"
    url = f"http://testserver{path}"
    return client.post(
        path,
        params,
        headers={"x-twilio-signature": signature if signature is not None else sign(url, params)},
    )


def test_a_signed_delivered_callback_marks_the_delivery_delivered(client, sent_sms):
    answer = post_receipt(client, sent_sms, {"MessageSid": "SM123", "MessageStatus": "delivered"})
    assert answer.status_code == 204, answer.content
    sent_sms.refresh_from_db()
    assert sent_sms.status == Status.DELIVERED


def test_an_undelivered_callback_makes_it_dead_and_fails_it_over(
    client, sent_sms, django_user_model
):
    sam = django_user_model.objects.create_user("sam", "sam@example.com")
    Delivery.objects.filter(pk=sent_sms.pk).update(user=sam)
    params = {"MessageSid": "SM123", "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert post_receipt(client, sent_sms, params).status_code == 204
    sent_sms.refresh_from_db()
    assert sent_sms.status == Status.DEAD and "30003" in sent_sms.last_error
    backup = Delivery.objects.get(failover_from=sent_sms)
    assert (backup.channel.name, backup.recipient) == ("mail", "sam@example.com")


def test_a_forged_or_unknown_callback_changes_nothing(client, sent_sms):
    params = {"MessageSid": "SM123", "MessageStatus": "delivered"}
    forged = post_receipt(client, sent_sms, params, signature="bm90IGEgc2lnbmF0dXJl")
    assert forged.status_code == 403 and "X-Twilio-Signature" in forged.json()["detail"]
    unknown = post_receipt(client, sent_sms, {"MessageSid": "SM999", "MessageStatus": "delivered"})
    assert unknown.status_code == 404 and "SM999" in unknown.json()["detail"]
    missing = post_receipt(client, sent_sms, {"MessageSid": "SM123"})
    assert missing.status_code == 400 and "MessageStatus" in missing.json()["detail"]
    sent_sms.refresh_from_db()
    assert sent_sms.status == Status.SENT


def test_anymail_tracking_marks_an_email_delivered_or_bounced(sent_sms):
    email = Channel.objects.create(name="email", kind="email")
    relay = Provider.objects.create(channel=email, name="postmark", url="anymail://postmark")
    rows = [
        Delivery.objects.create(
            notification=sent_sms.notification,
            channel=email,
            recipient=f"{name}@example.com",
            status=Status.SENT,
            provider=relay,
            provider_message_id=f"pm-{name}",
        )
        for name in ("ann", "bob")
    ]
    for row, event_type in zip(rows, ("delivered", "bounced"), strict=True):
        event = AnymailTrackingEvent(
            event_type=event_type, message_id=row.provider_message_id, description="mailbox full"
        )
        tracking.send(sender=object, event=event, esp_name="Postmark")
    statuses = [Delivery.objects.get(pk=r.pk).status for r in rows]
    assert statuses == [Status.DELIVERED, Status.DEAD]
