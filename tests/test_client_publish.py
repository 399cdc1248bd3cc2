"""POST /api/v1/topics/{topic}/publish: a client token's user publishes on a topic over HTTP (the
JS client's fallback when it cannot hold a WebSocket), with the rule, the validation and the ack of
a plain socket's ``publish`` frame (tests/test_ws_plain.py holds the socket's side)."""

from __future__ import annotations

import time

import pytest
from asgiref.sync import sync_to_async
from django.core import signing

from channels_app import api as realtime_api
from channels_app import tokens
from routing_app.models import Notification
from tests.apiclient import bearer

# The view authenticates and stores on routing_app's database threads: committed rows only.
pytestmark = pytest.mark.django_db(transaction=True)


def url(topic: str) -> str:
    return f"/api/v1/topics/{topic}/publish"


def token_for(user) -> str:
    return tokens.mint(user.pk).token


async def stored() -> list[tuple[str, str, str, dict]]:
    rows = Notification.objects.order_by("seq").values_list(
        "topic__name", "source", "event", "data"
    )
    return await sync_to_async(list)(rows)


async def test_publish_is_stored_as_a_user_notification_and_answered_with_the_socket_ack(
    api, operator
):
    answer = await api.post(
        url("alerts.ops"),
        json={"event": "deploy.start", "data": {"v": 2}, "ref": "p1"},
        headers=bearer(token_for(operator)),
    )
    assert answer.status_code == 202, answer.text
    row = await sync_to_async(Notification.objects.get)(topic__name="alerts.ops")
    assert answer.json() == {"type": "ack", "seq": row.seq, "id": str(row.id), "ref": "p1"}
    assert await stored() == [("alerts.ops", "user", "deploy.start", {"v": 2})]


async def test_ack_without_a_ref_has_none_and_severity_is_kept(api, operator):
    answer = await api.post(
        url("alerts.ops"),
        json={"event": "disk.full", "severity": "critical"},
        headers=bearer(token_for(operator)),
    )
    assert answer.status_code == 202, answer.text
    assert set(answer.json()) == {"type", "seq", "id"}
    row = await sync_to_async(Notification.objects.get)(topic__name="alerts.ops")
    assert (row.severity, row.data) == ("critical", {})


async def test_a_user_without_the_publish_right_is_refused_with_403(api, subscriber):
    answer = await api.post(
        url("alerts.k8s"), json={"event": "x"}, headers=bearer(token_for(subscriber))
    )
    assert answer.status_code == 403
    assert "you may not publish on topic 'alerts.k8s'" in answer.json()["detail"]
    assert await stored() == []


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (None, "send a client token"),
        ("forged", "token signature is invalid"),
        ("expired", "token has expired"),
    ],
)
async def test_missing_forged_or_expired_tokens_are_refused_with_401(api, operator, token, says):
    headers = {}
    if token == "forged":
        headers = bearer(token_for(operator) + "x")
    elif token == "expired":
        value = signing.dumps({"u": operator.pk, "e": int(time.time()) - 1}, salt=tokens.SALT)
        headers = bearer(value)
    answer = await api.post(url("alerts.ops"), json={"event": "x"}, headers=headers)
    assert answer.status_code == 401
    assert says in answer.json()["detail"]
    assert await stored() == []


async def test_an_api_key_is_not_a_client_token(api, operator, api_key):
    answer = await api.post(url("alerts.ops"), json={"event": "x"}, headers=bearer(api_key[1]))
    assert answer.status_code == 401


async def test_token_of_an_inactive_user_is_refused_with_401(api, operator):
    operator.is_active = False
    await sync_to_async(operator.save)()
    answer = await api.post(
        url("alerts.ops"), json={"event": "x"}, headers=bearer(token_for(operator))
    )
    assert answer.status_code == 401
    assert "no longer exists or is inactive" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"event": ""}, ["event"]),
        ({"event": "x", "data": [1]}, ["data"]),
        ({"event": "x", "severity": "loud"}, ["severity"]),
        ({"event": "x", "type": "publish"}, ["type"]),
        ({"data": {}}, ["event"]),
    ],
)
async def test_a_bad_body_is_refused_with_400_naming_the_field(api, operator, body, loc):
    answer = await api.post(url("alerts.ops"), json=body, headers=bearer(token_for(operator)))
    assert answer.status_code == 400, answer.text
    assert answer.json()["errors"][0]["loc"] == loc
    assert await stored() == []


async def test_a_bad_topic_name_is_refused_with_400(api, operator):
    answer = await api.post(
        url("Bad..Topic"), json={"event": "x"}, headers=bearer(token_for(operator))
    )
    assert answer.status_code == 400


async def test_publishing_faster_than_a_socket_may_is_refused_with_429(api, operator, monkeypatch):
    from django.core.cache import cache

    cache.clear()  # user ids repeat across test runs, and the window outlives a run
    monkeypatch.setattr(realtime_api, "PUBLISH_RATE", "1/m")
    headers = bearer(token_for(operator))
    first = await api.post(url("alerts.ops"), json={"event": "x"}, headers=headers)
    again = await api.post(url("alerts.ops"), json={"event": "y"}, headers=headers)
    assert first.status_code == 202, first.text
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) >= 1
    assert "publishes per user" in again.json()["detail"]
    assert [row[2] for row in await stored()] == ["x"]
