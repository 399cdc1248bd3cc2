"""The Web Push endpoints: GET /api/v1/push/key, POST and DELETE /api/v1/push/subscriptions. Who
may call them (a client token or a session with CSRF; never an API key nor anonymous), what a bad
subscription is told, and that subscribing again is the same row."""

from __future__ import annotations

import os
from urllib.parse import urlencode

import pytest
from django.test import Client

from channels_app import tokens
from routing_app.models import PushSubscription
from tests.apiclient import bearer
from tests.test_push import Browser, b64url, vapid_keys  # noqa: F401  (the fixture)

# Users and subscriptions are read on routing_app's database threads: committed rows only.
pytestmark = pytest.mark.django_db(transaction=True)

KEY_URL = "/api/v1/push/key"
URL = "/api/v1/push/subscriptions"
ENDPOINT = "https://fcm.googleapis.com/fcm/send/sam-laptop"


def browser_keys() -> dict[str, str]:
    browser = Browser.new()
    return {"p256dh": browser.p256dh, "auth": b64url(browser.auth)}


def subscription(endpoint: str = ENDPOINT, **keys: str) -> dict:
    """What a browser's PushSubscription.toJSON() gives."""
    return {"endpoint": endpoint, "expirationTime": None, "keys": {**browser_keys(), **keys}}


def at(endpoint: str) -> str:
    return f"{URL}?{urlencode({'endpoint': endpoint})}"


def token_of(user) -> dict[str, str]:
    return bearer(tokens.mint(user.pk).token)


def post(body, headers: dict[str, str], client: Client | None = None):
    return (client or Client()).post(URL, body, content_type="application/json", headers=headers)


def test_the_key_is_the_applicationserverkey_and_503_without_one(
    vapid_keys,  # noqa: F811
    subscriber,
    settings,
):
    answer = Client().get(KEY_URL, headers=token_of(subscriber))
    assert answer.status_code == 200, answer.content
    assert answer.json() == {"public_key": vapid_keys}

    settings.WEBPUSH_VAPID_PRIVATE_KEY = settings.WEBPUSH_VAPID_PUBLIC_KEY = ""
    answer = Client().get(KEY_URL, headers=token_of(subscriber))
    assert answer.status_code == 503
    assert "manage.py push keys" in answer.json()["detail"]


def test_subscribing_again_updates_the_same_row(subscriber, outsider):
    first = subscription()
    answer = post(first, token_of(subscriber))
    assert answer.status_code == 201, answer.content
    assert answer.json() == {"endpoint": ENDPOINT, "created": True}

    again = subscription()  # the browser's keys changed; then another user logs in there
    assert post(again, token_of(subscriber)).status_code == 200
    answer = post(again, token_of(outsider), Client(headers={"User-Agent": "Firefox/140"}))
    assert answer.status_code == 200
    assert answer.json() == {"endpoint": ENDPOINT, "created": False}

    [row] = PushSubscription.objects.all()
    assert (row.user, row.p256dh, row.auth) == (
        outsider,
        again["keys"]["p256dh"],
        again["keys"]["auth"],
    )
    assert row.user_agent == "Firefox/140"


def test_each_bad_field_is_named_with_the_reason(subscriber):
    body = subscription(
        "http://push.example.com/send/1",
        p256dh=b64url(b"\x04" + os.urandom(31)),
        auth="not base64url!",
    )
    answer = post(body, token_of(subscriber))
    assert answer.status_code == 400, answer.content
    errors = {tuple(e["loc"]): e["msg"] for e in answer.json()["errors"]}
    assert errors == {
        ("endpoint",): errors[("endpoint",)],
        ("keys", "p256dh"): "must decode to 65 bytes, not 32",
        ("keys", "auth"): errors[("keys", "auth")],
    }
    assert "https://" in errors[("endpoint",)]
    assert "base64url" in errors[("keys", "auth")]
    assert not PushSubscription.objects.exists()


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("https://10.0.0.7/push", "non-public address"),
        ("https://localhost:8443/push", "not localhost"),
        ("ftp://push.example.com/1", "https://"),
        ("https://user:pw@push.example.com/1", "user name or password"),
    ],
)
def test_endpoints_the_server_must_not_call_are_refused(subscriber, endpoint, reason):
    answer = post(subscription(endpoint), token_of(subscriber))
    assert answer.status_code == 400
    assert reason in answer.json()["errors"][0]["msg"]


def test_a_p256dh_that_is_no_curve_point_is_refused(subscriber):
    answer = post(subscription(p256dh=b64url(b"\x04" + b"\x01" * 64)), token_of(subscriber))
    assert answer.status_code == 400
    assert answer.json()["errors"] == [
        {"loc": ["keys", "p256dh"], "msg": "is not a point on the P-256 curve"}
    ]


def test_anonymous_api_keys_and_forged_tokens_are_refused(api_key, subscriber):
    _, raw_key = api_key
    forged = tokens.mint(subscriber.pk).token[:-3] + "abc"
    for headers in ({}, bearer(raw_key), bearer(forged), {"Authorization": "Basic c2FtOnB3"}):
        answer = post(subscription(), headers)
        assert answer.status_code == 401, (headers, answer.content)
        assert answer.json()["detail"]
        assert Client().get(KEY_URL, headers=headers).status_code == 401
    assert "API key cannot subscribe" in post(subscription(), bearer(raw_key)).json()["detail"]
    assert not PushSubscription.objects.exists()


def test_a_session_subscribes_with_the_csrf_token_only(subscriber):
    client = Client(enforce_csrf_checks=True)
    client.force_login(subscriber)
    csrf = client.get("/api/v1/csrf").json()["csrf_token"]

    assert post(subscription(), {}, client).status_code == 403
    assert post(subscription(), {"X-CSRFToken": csrf}, client).status_code == 201
    assert PushSubscription.objects.get().user == subscriber


def test_unsubscribe_by_query_or_body_removes_only_ones_own(subscriber, outsider):
    post(subscription(), token_of(subscriber))
    theirs = "https://updates.push.services.mozilla.com/wpush/v2/olga"
    post(subscription(theirs), token_of(outsider))
    client = Client()

    answer = client.delete(at(theirs), headers=token_of(subscriber))
    assert answer.status_code == 404  # Olga's: not Sam's to remove
    answer = client.delete(at(ENDPOINT), headers=token_of(subscriber))
    assert answer.status_code == 204
    assert client.delete(at(ENDPOINT), headers=token_of(subscriber)).status_code == 404
    answer = client.delete(
        URL, {"endpoint": theirs}, content_type="application/json", headers=token_of(outsider)
    )
    assert answer.status_code == 204
    assert not PushSubscription.objects.exists()
    assert client.delete(URL, headers=token_of(outsider)).status_code == 400
