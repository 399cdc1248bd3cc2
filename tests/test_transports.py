"""The email, SMS and webhook transports against real peers: an SMTP server (aiosmtpd) and an HTTP
receiver standing in for an SMS gateway, an ESP's API or a webhook endpoint (tests/peers.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime
from urllib.parse import parse_qs

import httpx
import pytest
from standardwebhooks import Webhook

from routing_app.delivery import http
from routing_app.delivery.transports import DeliveryError, Receipt, transport_for
from routing_app.delivery.transports.sms import twilio_signature, verify_twilio_signature
from routing_app.models import Channel, Delivery, Notification, Provider, Topic
from tests.peers import HTTPReceiver, Reply, SMTPServer, closed_port_url

pytestmark = [
    pytest.mark.django_db,
    # aiosmtpd's warning about AUTH without TLS: the test SMTP server has no certificate.
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
]

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"a secret of the receiver, 32 b!!").decode()
CRASHLOOP = {"namespace": "prod", "pod": "api-7d9f", "reason": "CrashLoopBackOff", "count": 5}
ALERT = {
    "alertname": "HighLatency",
    "status": "firing",
    "labels": {"alertname": "HighLatency", "severity": "critical", "instance": "api-1"},
    "annotations": {"summary": "p99 above 1 s", "description": "for 10 minutes"},
    "startsAt": "2026-12-03T07:00:00Z",
    "endsAt": "0001-01-01T00:00:00Z",
    "generatorURL": "http://prometheus/graph?g0.expr=latency",
    "externalURL": "http://alertmanager:9093",
}


def make_delivery(
    kind: str,
    recipient: str,
    url: str,
    *,
    channel_options: dict | None = None,
    provider_options: dict | None = None,
    credentials_env: str = "",
    event: str = "pod.crashloop",
    severity: str = "error",
    data: dict | None = None,
) -> tuple[Delivery, Provider]:
    """A saved notification, channel, provider and delivery, as a worker would load them."""
    topic = Topic.objects.create(name="alerts.k8s")
    notification = Notification.objects.create(
        topic=topic,
        seq=1,
        source="k8s",
        event=event,
        severity=severity,
        data=CRASHLOOP if data is None else data,
    )
    channel = Channel.objects.create(name=f"{kind}-main", kind=kind, options=channel_options or {})
    provider = Provider.objects.create(
        channel=channel,
        name=f"{kind}-provider",
        url=url,
        credentials_env=credentials_env,
        options=provider_options or {},
    )
    delivery = Delivery.objects.create(
        notification=notification, channel=channel, recipient=recipient
    )
    return delivery, provider


# --- email --------------------------------------------------------------------------------------


def test_email_arrives_with_rendered_subject_and_text_and_html_parts(smtp_server):
    data = {**CRASHLOOP, "note": "<b>restarts</b> & backoff"}
    delivery, provider = make_delivery(
        "email",
        "sam@example.com",
        f"smtp://127.0.0.1:{smtp_server.port}",
        channel_options={"from_email": "alerts@notify.example", "reply_to": "ops@example.com"},
        data=data,
    )

    receipt = transport_for("email").send(delivery, provider, timeout_s=5)

    [message] = smtp_server.wait_for(1)
    assert message["Subject"] == "[ERROR] pod.crashloop on alerts.k8s"
    assert message["From"] == "alerts@notify.example"
    assert message["To"] == "sam@example.com"
    assert message["Reply-To"] == "ops@example.com"
    assert message["Auto-Submitted"] == "auto-generated"
    assert receipt.provider_message_id == message["Message-ID"]
    assert smtp_server.envelopes == [("alerts@notify.example", ["sam@example.com"])]
    text = message.get_body(("plain",)).get_content()
    assert "pod: api-7d9f" in text
    assert "note: <b>restarts</b> & backoff" in text  # plain text is not HTML-escaped
    html = message.get_body(("html",)).get_content()
    assert "<table" in html
    assert "api-7d9f" in html
    assert "&lt;b&gt;restarts&lt;/b&gt; &amp; backoff" in html
    assert "<b>restarts</b>" not in html


def test_email_boundary_never_appears_in_its_parts(smtp_server, monkeypatch):
    """The MIME boundary is chosen when the message is built; one found in a part is drawn
    again (here the first draw is written into the body on purpose)."""
    from routing_app.delivery.transports import email as email_transport

    taken = email_transport.BOUNDARY_FORMAT % 1
    draws = iter([1, 2])
    monkeypatch.setattr(email_transport.random, "randrange", lambda _: next(draws))
    delivery, provider = make_delivery(
        "email",
        "sam@example.com",
        f"smtp://127.0.0.1:{smtp_server.port}",
        data={"note": f"--{taken}"},
    )

    transport_for("email").send(delivery, provider, timeout_s=5)

    [message] = smtp_server.wait_for(1)
    assert message.get_boundary() == email_transport.BOUNDARY_FORMAT % 2
    assert f"note: --{taken}" in message.get_body(("plain",)).get_content()
    assert taken in message.get_body(("html",)).get_content()


HEADER_CASES = 600  # random header values compared with compat32's own folding


def test_email_headers_are_folded_exactly_as_compat32_folds_them():
    import random
    import string
    from email.policy import compat32

    from routing_app.delivery.transports.email import HEADER_FOLDING

    def folded(fold, name, value):
        try:
            return fold(name, value)
        except Exception as exc:  # noqa: BLE001  (compat32's refusals must be ours too)
            return type(exc)

    rng = random.Random(1204)  # noqa: S311  (test data, reproducible)
    alphabet = string.ascii_letters + string.digits + " \t<>@.,;:\"'()[]=+-_/?!#%&*~^{}|é…\n"
    names = ["Subject", "From", "To", "Reply-To", "X-Notify-Delivery", "Content-Type"]
    short_cuts = 0
    for _ in range(HEADER_CASES):
        name = rng.choice(names)
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        short_cuts += HEADER_FOLDING._one_line(name, value)
        for linesep in ("\n", "\r\n"):
            ours, stdlib = HEADER_FOLDING.clone(linesep=linesep), compat32.clone(linesep=linesep)
            for kind in ("fold_binary", "fold"):
                mine = folded(getattr(ours, kind), name, value)
                assert mine == folded(getattr(stdlib, kind), name, value), (kind, value)
    assert 0.1 * HEADER_CASES < short_cuts < 0.9 * HEADER_CASES  # both ways were compared


def test_email_uses_the_event_template_when_there_is_one(smtp_server):
    delivery, provider = make_delivery(
        "email",
        "oscar@example.com",
        f"smtp://127.0.0.1:{smtp_server.port}",
        event="alert.firing",
        severity="critical",
        data=ALERT,
    )

    transport_for("email").send(delivery, provider, timeout_s=5)

    [message] = smtp_server.wait_for(1)
    assert message["Subject"] == "[FIRING CRITICAL] HighLatency: p99 above 1 s"
    text = message.get_body(("plain",)).get_content()
    assert "instance=api-1" in text
    assert "for 10 minutes" in text
    assert (
        'href="http://prometheus/graph?g0.expr=latency"'
        in message.get_body(("html",)).get_content()
    )


def test_email_from_defaults_to_default_from_email(smtp_server, settings):
    settings.DEFAULT_FROM_EMAIL = "notify@ops.example"
    delivery, provider = make_delivery(
        "email", "sam@example.com", f"smtp://127.0.0.1:{smtp_server.port}"
    )

    transport_for("email").send(delivery, provider, timeout_s=5)

    [message] = smtp_server.wait_for(1)
    assert message["From"] == "notify@ops.example"
    assert message["Reply-To"] is None


def test_email_subject_is_one_line(smtp_server):
    delivery, provider = make_delivery(
        "email", "sam@example.com", f"smtp://127.0.0.1:{smtp_server.port}"
    )
    Notification.objects.filter(pk=delivery.notification.pk).update(event="pod.crash\nloop")
    delivery.notification.refresh_from_db()

    transport_for("email").send(delivery, provider, timeout_s=5)

    [message] = smtp_server.wait_for(1)
    assert message["Subject"] == "[ERROR] pod.crash loop on alerts.k8s"


def test_smtp_auth_uses_the_password_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "s3cret pass")
    with SMTPServer(credentials=("mailer", "s3cret pass")) as server:
        delivery, provider = make_delivery(
            "email",
            "sam@example.com",
            f"smtp://mailer@127.0.0.1:{server.port}",
            credentials_env="TEST_SMTP_PASSWORD",
        )

        transport_for("email").send(delivery, provider, timeout_s=5)

        server.wait_for(1)
        assert server.logins == [("mailer", "s3cret pass")]


def test_smtp_auth_refused_is_permanent_and_names_the_variable(monkeypatch):
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong")
    with SMTPServer(credentials=("mailer", "right")) as server:
        delivery, provider = make_delivery(
            "email",
            "sam@example.com",
            f"smtp://mailer@127.0.0.1:{server.port}",
            credentials_env="TEST_SMTP_PASSWORD",
        )

        with pytest.raises(DeliveryError) as caught:
            transport_for("email").send(delivery, provider, timeout_s=5)

        assert caught.value.permanent
        assert "TEST_SMTP_PASSWORD" in str(caught.value)
        assert "wrong" not in str(caught.value)
        assert server.messages.items == []


def test_smtp_password_variable_unset_is_permanent(monkeypatch, smtp_server):
    monkeypatch.delenv("TEST_SMTP_PASSWORD", raising=False)
    delivery, provider = make_delivery(
        "email",
        "sam@example.com",
        f"smtp://mailer@127.0.0.1:{smtp_server.port}",
        credentials_env="TEST_SMTP_PASSWORD",
    )

    with pytest.raises(DeliveryError, match="TEST_SMTP_PASSWORD") as caught:
        transport_for("email").send(delivery, provider, timeout_s=5)

    assert caught.value.permanent


def test_smtp_url_with_a_password_is_refused():
    delivery, provider = make_delivery(
        "email", "sam@example.com", "smtp://mailer:hunter2@127.0.0.1:2525"
    )

    with pytest.raises(DeliveryError, match="holds a password") as caught:
        transport_for("email").send(delivery, provider, timeout_s=5)

    assert caught.value.permanent
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("reply", "permanent"),
    [("550 5.1.1 No such user", True), ("451 4.7.1 Greylisted, try again later", False)],
)
def test_smtp_recipient_refusal_is_permanent_for_5xx_and_transient_for_4xx(reply, permanent):
    with SMTPServer(refuse={"gone@example.com": reply}) as server:
        delivery, provider = make_delivery(
            "email", "gone@example.com", f"smtp://127.0.0.1:{server.port}"
        )

        with pytest.raises(DeliveryError) as caught:
            transport_for("email").send(delivery, provider, timeout_s=5)

        assert caught.value.permanent is permanent
        assert reply.split()[0] in str(caught.value)
        assert server.messages.items == []


def test_smtp_connection_refused_is_transient():
    delivery, provider = make_delivery("email", "sam@example.com", closed_port_url("smtp"))

    with pytest.raises(DeliveryError) as caught:
        transport_for("email").send(delivery, provider, timeout_s=2)

    assert not caught.value.permanent
    assert not caught.value.timeout


def test_smtp_connection_is_kept_for_the_next_send(smtp_server):
    delivery, provider = make_delivery(
        "email", "sam@example.com", f"smtp://127.0.0.1:{smtp_server.port}"
    )
    other = Delivery.objects.create(
        notification=delivery.notification, channel=delivery.channel, recipient="olga@example.com"
    )

    transport_for("email").send(delivery, provider, timeout_s=5)
    transport_for("email").send(other, provider, timeout_s=5)

    first, second = smtp_server.wait_for(2)
    assert [first["To"], second["To"]] == ["sam@example.com", "olga@example.com"]
    assert first["Message-ID"] != second["Message-ID"]


def test_smtp_kept_connection_closed_by_the_server_is_reopened_once(caplog):
    with SMTPServer() as first:
        delivery, provider = make_delivery(
            "email", "sam@example.com", f"smtp://127.0.0.1:{first.port}"
        )
        transport_for("email").send(delivery, provider, timeout_s=5)
        first.wait_for(1)
    other = Delivery.objects.create(
        notification=delivery.notification, channel=delivery.channel, recipient="olga@example.com"
    )

    # The kept connection went with the first server; the next send notices and reconnects.
    with (
        SMTPServer(port=first.port) as second,
        caplog.at_level(logging.INFO, logger="routing_app.delivery.email"),
    ):
        transport_for("email").send(other, provider, timeout_s=5)

        [message] = second.wait_for(1)
        assert message["To"] == "olga@example.com"
    assert "reopening" in caplog.text


def test_console_email_is_logged(caplog):
    delivery, provider = make_delivery("email", "sam@example.com", "console://")

    with caplog.at_level(logging.INFO, logger="routing_app.delivery.email"):
        receipt = transport_for("email").send(delivery, provider, timeout_s=1)

    assert isinstance(receipt, Receipt)
    [record] = [r for r in caplog.records if r.name == "routing_app.delivery.email"]
    logged = record.getMessage()
    assert "sam@example.com" in logged
    assert "Subject: [ERROR] pod.crashloop on alerts.k8s" in logged
    assert "pod: api-7d9f" in logged


POSTMARK_OK = {
    "To": "sam@example.com",
    "SubmittedAt": "2026-12-03T07:00:00Z",
    "MessageID": "b7bc2f4a-e38e-4336-af7d-e6c392c2f817",
    "ErrorCode": 0,
    "Message": "OK",
}


def postmark_delivery(receiver: HTTPReceiver, monkeypatch):
    monkeypatch.setenv("TEST_POSTMARK_TOKEN", "server-token-1")
    return make_delivery(
        "email",
        "sam@example.com",
        "anymail://postmark",
        channel_options={"from_email": "alerts@notify.example"},
        provider_options={"anymail": {"api_url": receiver.url + "/"}},
        credentials_env="TEST_POSTMARK_TOKEN",
    )


def test_anymail_esp_gets_the_message_with_the_key_from_the_variable(receiver, monkeypatch):
    receiver.program(Reply(200, json.dumps(POSTMARK_OK).encode()))
    delivery, provider = postmark_delivery(receiver, monkeypatch)

    receipt = transport_for("email").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    assert request.path == "/email"
    assert request.headers["X-Postmark-Server-Token"] == "server-token-1"
    sent = request.json()
    assert sent["To"] == "sam@example.com"
    assert sent["Subject"] == "[ERROR] pod.crashloop on alerts.k8s"
    assert "pod: api-7d9f" in sent["TextBody"]
    assert "<table" in sent["HtmlBody"]
    assert receipt.provider_message_id == POSTMARK_OK["MessageID"]


@pytest.mark.parametrize(
    ("status", "answer", "permanent"),
    [
        (422, {"ErrorCode": 300, "Message": "Invalid email request"}, True),
        (429, {"ErrorCode": 429, "Message": "Rate limit exceeded"}, False),
        (500, {"ErrorCode": 500, "Message": "Internal server error"}, False),
        (
            422,
            {
                "ErrorCode": 406,
                "Message": "You tried to send to a recipient that has been marked as inactive."
                "\nFound inactive addresses: sam@example.com.\nInactive recipients are ones "
                "that have generated a hard bounce or a spam complaint.",
            },
            True,
        ),
    ],
    ids=["422", "429", "500", "inactive-recipient"],
)
def test_anymail_errors_are_permanent_for_4xx_and_refused_recipients(
    receiver, monkeypatch, status, answer, permanent
):
    receiver.program(Reply(status, json.dumps(answer).encode()))
    delivery, provider = postmark_delivery(receiver, monkeypatch)

    with pytest.raises(DeliveryError) as caught:
        transport_for("email").send(delivery, provider, timeout_s=5)

    assert caught.value.permanent is permanent


def test_smtp_health_check_passes_when_the_server_answers(smtp_server):
    _, provider = make_delivery("email", "sam@example.com", f"smtp://127.0.0.1:{smtp_server.port}")

    transport_for("email").check_health(provider, timeout_s=2)


def test_smtp_health_check_fails_when_nothing_listens():
    _, provider = make_delivery("email", "sam@example.com", closed_port_url("smtp"))

    with pytest.raises(DeliveryError) as caught:
        transport_for("email").check_health(provider, timeout_s=2)

    assert not caught.value.permanent


def test_console_email_is_always_healthy():
    _, provider = make_delivery("email", "sam@example.com", "console://")

    transport_for("email").check_health(provider, timeout_s=1)


# --- SMS --------------------------------------------------------------------------------------

TWILIO_CREATED = {"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued"}


def sms_url(receiver: HTTPReceiver) -> str:
    return f"{receiver.url}/2010-04-01/Accounts/AC0123456789/Messages.json"


def test_sms_gateway_gets_to_from_body_with_basic_auth(receiver, monkeypatch):
    monkeypatch.setenv("TEST_SMS_TOKEN", "gateway-token")
    receiver.program(Reply(201, json.dumps(TWILIO_CREATED).encode()))
    delivery, provider = make_delivery(
        "sms",
        "+4915112345678",
        sms_url(receiver),
        channel_options={"from_number": "+4930123456"},
        credentials_env="TEST_SMS_TOKEN",
    )

    receipt = transport_for("sms").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    assert request.method == "POST"
    assert request.path == "/2010-04-01/Accounts/AC0123456789/Messages.json"
    form = {key: values[0] for key, values in parse_qs(request.body.decode()).items()}
    assert form["To"] == "+4915112345678"
    assert form["From"] == "+4930123456"
    assert form["Body"].startswith("[ERROR] pod.crashloop on alerts.k8s")
    assert "pod: api-7d9f" in form["Body"]
    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "AC0123456789:gateway-token"
    assert receipt.provider_message_id == TWILIO_CREATED["sid"]
    assert receipt.http_status == 201


def test_sms_sender_falls_back_to_the_provider_option(receiver):
    receiver.program(Reply(201, json.dumps(TWILIO_CREATED).encode()))
    delivery, provider = make_delivery(
        "sms", "+4915112345678", sms_url(receiver), provider_options={"from": "+4930999"}
    )

    transport_for("sms").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    assert parse_qs(request.body.decode())["From"] == ["+4930999"]
    assert "Authorization" not in request.headers  # the provider names no secret


def test_sms_without_a_sender_is_permanent(receiver):
    delivery, provider = make_delivery("sms", "+4915112345678", sms_url(receiver))

    with pytest.raises(DeliveryError, match="from_number") as caught:
        transport_for("sms").send(delivery, provider, timeout_s=5)

    assert caught.value.permanent
    assert receiver.requests.items == []


def test_sms_text_is_cut_to_the_channels_segments(receiver):
    receiver.program(Reply(201, json.dumps(TWILIO_CREATED).encode()))
    delivery, provider = make_delivery(
        "sms",
        "+4915112345678",
        sms_url(receiver),
        channel_options={"from_number": "+4930123456", "max_segments": 1},
        data={"message": "back-off restarting failed container " * 20},
    )

    transport_for("sms").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    body = parse_qs(request.body.decode())["Body"][0]
    assert len(body) <= 160
    assert body.endswith("...")


def test_sms_uses_the_alert_template(receiver):
    receiver.program(Reply(201, json.dumps(TWILIO_CREATED).encode()))
    delivery, provider = make_delivery(
        "sms",
        "+4915112345678",
        sms_url(receiver),
        channel_options={"from_number": "+4930123456"},
        event="alert.firing",
        severity="critical",
        data=ALERT,
    )

    transport_for("sms").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    body = parse_qs(request.body.decode())["Body"][0]
    assert body == "FIRING CRITICAL: HighLatency - p99 above 1 s (api-1)"


def test_sms_gateway_refusal_is_permanent_with_its_explanation(receiver):
    refusal = {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400}
    receiver.program(Reply(400, json.dumps(refusal).encode()))
    delivery, provider = make_delivery(
        "sms", "+1555", sms_url(receiver), channel_options={"from_number": "+4930123456"}
    )

    with pytest.raises(DeliveryError) as caught:
        transport_for("sms").send(delivery, provider, timeout_s=5)

    assert caught.value.permanent
    assert caught.value.http_status == 400
    assert "Invalid 'To' Phone Number" in str(caught.value)


def test_sms_gateway_overload_is_transient(receiver):
    receiver.program(Reply(503, b"busy", headers={"Retry-After": "3"}))
    delivery, provider = make_delivery(
        "sms", "+4915112345678", sms_url(receiver), channel_options={"from_number": "+49301"}
    )

    with pytest.raises(DeliveryError) as caught:
        transport_for("sms").send(delivery, provider, timeout_s=5)

    assert not caught.value.permanent
    assert caught.value.retry_after_s == 3


def test_console_sms_is_logged(caplog):
    delivery, provider = make_delivery("sms", "+4915112345678", "console://")

    with caplog.at_level(logging.INFO, logger="routing_app.delivery.sms"):
        transport_for("sms").send(delivery, provider, timeout_s=1)

    [record] = [r for r in caplog.records if r.name == "routing_app.delivery.sms"]
    assert "+4915112345678" in record.getMessage()
    assert "[ERROR] pod.crashloop on alerts.k8s" in record.getMessage()


TWILIO_DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


def test_twilio_signature_matches_twilios_published_example():
    # Token "12345" and this signature: the example of Twilio's request-validation docs, also
    # in the test suites of its helper libraries.
    assert verify_twilio_signature(
        TWILIO_DOC_URL, TWILIO_DOC_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", "12345"
    )


def test_twilio_signature_is_the_documented_hmac():
    data = TWILIO_DOC_URL + "".join(k + TWILIO_DOC_PARAMS[k] for k in sorted(TWILIO_DOC_PARAMS))
    expected = base64.b64encode(hmac.new(b"token", data.encode(), hashlib.sha1).digest()).decode()

    assert twilio_signature(TWILIO_DOC_URL, TWILIO_DOC_PARAMS, "token") == expected


def test_twilio_signature_refuses_a_changed_request():
    signature = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    changed = {**TWILIO_DOC_PARAMS, "Digits": "9999"}
    assert not verify_twilio_signature(TWILIO_DOC_URL, changed, signature, "12345")
    assert not verify_twilio_signature(
        TWILIO_DOC_URL + "&x=1", TWILIO_DOC_PARAMS, signature, "12345"
    )
    assert not verify_twilio_signature(TWILIO_DOC_URL, TWILIO_DOC_PARAMS, signature, "54321")
    assert not verify_twilio_signature(TWILIO_DOC_URL, TWILIO_DOC_PARAMS, "", "12345")


# --- webhooks ---------------------------------------------------------------------------------


def webhook_delivery(receiver: HTTPReceiver, monkeypatch, **kwargs):
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    return make_delivery(
        "webhook",
        receiver.url + "/hooks/notify",
        receiver.url + "/hooks/notify",
        credentials_env="TEST_WEBHOOK_SECRET",
        **kwargs,
    )


def test_webhook_receiver_gets_the_signed_body(receiver, monkeypatch):
    delivery, provider = webhook_delivery(
        receiver, monkeypatch, channel_options={"headers": {"X-Team": "ops"}}
    )

    receipt = transport_for("webhook").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    assert request.method == "POST"
    assert request.path == "/hooks/notify"
    verified = Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    assert verified == {
        "delivery_id": delivery.pk,
        "notification": delivery.notification.envelope(),
    }
    assert request.headers["webhook-id"] == str(delivery.pk)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("notify/")
    assert request.headers["x-team"] == "ops"
    assert b": " not in request.body  # compact JSON
    assert receipt.http_status == 200


def test_webhook_without_a_secret_is_sent_unsigned(receiver):
    delivery, provider = make_delivery("webhook", receiver.url, receiver.url)

    transport_for("webhook").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    assert "webhook-signature" not in request.headers
    assert request.headers["webhook-id"] == str(delivery.pk)
    assert request.headers["webhook-timestamp"].isdigit()


def test_webhook_headers_option_cannot_replace_the_signature(receiver, monkeypatch):
    delivery, provider = webhook_delivery(
        receiver, monkeypatch, channel_options={"headers": {"webhook-signature": "v1,forged"}}
    )

    transport_for("webhook").send(delivery, provider, timeout_s=5)

    [request] = receiver.wait_for(1)
    Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)


def test_webhook_secret_that_is_not_base64_is_permanent(receiver, monkeypatch):
    delivery, provider = webhook_delivery(receiver, monkeypatch)
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "whsec_a")  # one base64 character: no byte

    with pytest.raises(DeliveryError, match="whsec_") as caught:
        transport_for("webhook").send(delivery, provider, timeout_s=5)

    assert caught.value.permanent
    assert receiver.requests.items == []


@pytest.mark.parametrize(
    ("reply", "permanent", "disable", "retry_after_s"),
    [
        (Reply(400, b'{"error": "unknown field severity"}'), True, False, None),
        (Reply(404, b"no such hook"), True, False, None),
        (Reply(410, b""), True, True, None),
        (Reply(408, b""), False, False, None),
        (Reply(429, b"slow down", headers={"Retry-After": "7"}), False, False, 7),
        (Reply(503, b"maintenance"), False, False, None),
        (Reply(301, b"", headers={"Location": "https://new.example/hook"}), True, False, None),
    ],
    ids=["400", "404", "410", "408", "429", "503", "301"],
)
def test_webhook_answers_are_classified(
    receiver, monkeypatch, reply, permanent, disable, retry_after_s
):
    receiver.program(reply)
    delivery, provider = webhook_delivery(receiver, monkeypatch)

    with pytest.raises(DeliveryError) as caught:
        transport_for("webhook").send(delivery, provider, timeout_s=5)

    error = caught.value
    assert error.permanent is permanent
    assert error.disable_provider is disable
    assert error.retry_after_s == retry_after_s
    assert error.http_status == reply.status
    assert not error.timeout
    assert str(reply.status) in str(error)


def test_webhook_refusal_message_carries_the_start_of_the_body(receiver, monkeypatch):
    receiver.program(Reply(422, b'{"error": "unknown field severity"}' + b"x" * 1000))
    delivery, provider = webhook_delivery(receiver, monkeypatch)

    with pytest.raises(DeliveryError) as caught:
        transport_for("webhook").send(delivery, provider, timeout_s=5)

    assert "unknown field severity" in str(caught.value)
    assert len(str(caught.value)) < 300


def test_webhook_410_says_gone(receiver, monkeypatch):
    receiver.program(Reply(410))
    delivery, provider = webhook_delivery(receiver, monkeypatch)

    with pytest.raises(DeliveryError, match="410 Gone"):
        transport_for("webhook").send(delivery, provider, timeout_s=5)


def test_webhook_hung_receiver_is_a_timeout(monkeypatch):
    with HTTPReceiver(default=Reply(delay_s=60)) as hung:
        delivery, provider = webhook_delivery(hung, monkeypatch)

        with pytest.raises(DeliveryError) as caught:
            transport_for("webhook").send(delivery, provider, timeout_s=0.3)

        assert caught.value.timeout
        assert not caught.value.permanent
        hung.wait_for(1)  # it did arrive; the answer is what never came


def test_webhook_connection_refused_is_transient():
    url = closed_port_url("http")
    delivery, provider = make_delivery("webhook", url, url)

    with pytest.raises(DeliveryError) as caught:
        transport_for("webhook").send(delivery, provider, timeout_s=2)

    assert not caught.value.permanent
    assert not caught.value.timeout


def test_retry_after_as_an_http_date():
    now = datetime(2026, 12, 3, 7, 0, 0, tzinfo=UTC)
    response = httpx.Response(429, headers={"Retry-After": "Thu, 03 Dec 2026 07:00:30 GMT"})
    assert http.retry_after_s(response, now=now) == 30
    past = httpx.Response(429, headers={"Retry-After": "Thu, 03 Dec 2026 06:00:00 GMT"})
    assert http.retry_after_s(past, now=now) == 0
    assert http.retry_after_s(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert http.retry_after_s(httpx.Response(429)) is None


# --- HTTP health checks ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sms", "webhook"])
def test_http_health_check_gets_the_health_url(receiver, kind):
    _, provider = make_delivery(
        kind, "x", sms_url(receiver), provider_options={"health_url": receiver.url + "/health"}
    )

    transport_for(kind).check_health(provider, timeout_s=2)

    [request] = receiver.wait_for(1)
    assert (request.method, request.path) == ("GET", "/health")


@pytest.mark.parametrize("kind", ["sms", "webhook"])
def test_http_health_check_fails_on_an_error_answer(receiver, kind):
    receiver.program(Reply(503))
    _, provider = make_delivery(
        kind, "x", sms_url(receiver), provider_options={"health_url": receiver.url + "/health"}
    )

    with pytest.raises(DeliveryError) as caught:
        transport_for(kind).check_health(provider, timeout_s=2)

    assert caught.value.http_status == 503


def test_http_health_check_fails_when_nothing_listens():
    _, provider = make_delivery(
        "webhook",
        "x",
        "http://127.0.0.1:9",
        provider_options={"health_url": closed_port_url("http")},
    )

    with pytest.raises(DeliveryError):
        transport_for("webhook").check_health(provider, timeout_s=2)


def test_webhook_without_health_url_is_healthy_and_not_called(receiver):
    _, provider = make_delivery("webhook", receiver.url, receiver.url)

    transport_for("webhook").check_health(provider, timeout_s=2)

    assert receiver.requests.items == []


def test_anymail_health_check_gets_the_health_url(receiver):
    receiver.program(Reply(500))
    _, provider = make_delivery(
        "email",
        "sam@example.com",
        "anymail://postmark",
        provider_options={"health_url": receiver.url + "/status"},
    )

    with pytest.raises(DeliveryError):
        transport_for("email").check_health(provider, timeout_s=2)
