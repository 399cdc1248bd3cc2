"""The fast path of a single post (routing_app/ingest_fast.py) answers exactly as the endpoint.

Each case is sent twice through the real ASGI application, once with the fast path and once
without it, each time with a fresh key and topics of its own; status, headers and body must be
the same (ids, seqs and the per-run names aside).
"""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async

from routing_app import asgi_api, ingest_fast
from routing_app.models import Notification
from tests.apiclient import create_key

URL = "/api/v1/notifications"
pytestmark = pytest.mark.django_db(transaction=True)

JSON = {"Content-Type": "application/json"}


def cases(tag: str) -> list[tuple[str, dict, bytes | dict, dict]]:
    """(name, extra key fields, body, headers) of each request, names made unique by ``tag``."""
    topic = f"fast.{tag}"
    every_field = {
        "topic": topic,
        "event": "pod.crash",
        "data": {"pod": "web-1", "n": [1, 2.5, None, True]},
        "severity": "critical",
        "source": "k8s",
        "idempotency_key": f"k-{tag}",
        "recipients": ["ops@example.com"],
    }
    return [
        ("minimal", {}, {"topic": topic, "event": "e"}, JSON),
        (
            "every field",
            {},
            every_field,
            JSON,
        ),
        (
            "replayed",
            {},
            every_field,
            JSON,
        ),
        (
            "key reused",
            {},
            {"topic": topic, "event": "other", "source": "k8s", "idempotency_key": f"k-{tag}"},
            JSON,
        ),
        (
            "charset",
            {},
            {"topic": topic, "event": "e"},
            {"Content-Type": "application/json; charset=utf-8"},
        ),
        ("null data", {}, {"topic": topic, "event": "e", "data": None}, JSON),
        ("no key", None, {"topic": topic, "event": "e"}, JSON),
        ("forged key", "forged", {"topic": topic, "event": "e"}, JSON),
        ("text body", {}, b"topic=x", {"Content-Type": "text/plain"}),
        ("bad json", {}, b'{"topic": ', JSON),
        ("a list", {}, b"[]", JSON),
        ("unknown field", {}, {"topic": topic, "event": "e", "colour": "red"}, JSON),
        ("bad topic", {}, {"topic": "Bad Topic!", "event": "e"}, JSON),
        ("number topic", {}, {"topic": 7, "event": "e"}, JSON),
        ("data not an object", {}, {"topic": topic, "event": "e", "data": [1]}, JSON),
        ("bad severity", {}, {"topic": topic, "event": "e", "severity": "loud"}, JSON),
        ("null severity", {}, {"topic": topic, "event": "e", "severity": None}, JSON),
        ("empty event", {}, {"topic": topic, "event": ""}, JSON),
        ("NUL in data", {}, {"topic": topic, "event": "e", "data": {"a": "x\x00"}}, JSON),
        ("long recipient", {}, {"topic": topic, "event": "e", "recipients": ["a" * 501]}, JSON),
        ("too big", {}, {"topic": topic, "event": "e", "data": {"b": "x" * 70_000}}, JSON),
        ("no ingest scope", {"scopes": ["tokens"]}, {"topic": topic, "event": "e"}, JSON),
        (
            "topic not allowed",
            {"allowed_topics": "other.*"},
            {"topic": topic, "event": "e"},
            JSON,
        ),
        (
            "source not allowed",
            {"allowed_sources": ["api"]},
            {"topic": topic, "event": "e", "source": "workflow"},
            JSON,
        ),
        ("cors", {}, {"topic": topic, "event": "e"}, {**JSON, "Origin": "http://localhost:3000"}),
    ]


async def answers(api, tag: str) -> dict[str, tuple]:
    out = {}
    shared_key = (await sync_to_async(create_key)(f"shared-{tag}"))[1]
    for name, key_fields, body, headers in cases(tag):
        headers = dict(headers)
        if key_fields == "forged":
            headers["Authorization"] = "Bearer nk_abcdefgh_notarealkeyatall"
        elif key_fields is not None:
            raw = (
                (await sync_to_async(create_key)(f"{name}-{tag}", **key_fields))[1]
                if key_fields
                else shared_key
            )
            headers["Authorization"] = f"Bearer {raw}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        answer = await api.post(URL, content=content, headers=headers)
        out[name] = normalized(answer, tag)
    return out


def normalized(answer, tag: str) -> tuple:
    headers = sorted(
        (k, v) for k, v in answer.headers.items() if k not in ("date", "server", "content-length")
    )
    text = answer.text.replace(tag, "TAG")
    try:
        body = json.loads(text)
    except ValueError:
        return answer.status_code, headers, text
    if isinstance(body, dict) and "id" in body:
        body["id"] = "ID"
    return answer.status_code, headers, body


async def test_every_answer_is_the_endpoints_own(api, monkeypatch):
    fast = await answers(api, "f1")
    monkeypatch.setattr(ingest_fast, "_ENABLED", False)
    slow = await answers(api, "s1")
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name] == slow[name], name
    statuses = {name: answer[0] for name, answer in fast.items()}
    assert statuses["minimal"] == statuses["every field"] == statuses["replayed"] == 202
    assert statuses["key reused"] == 422
    assert statuses["no key"] == statuses["forged key"] == 401
    assert (statuses["text body"], statuses["too big"]) == (415, 413)
    assert statuses["topic not allowed"] == statuses["source not allowed"] == 403
    assert statuses["no ingest scope"] == 403
    assert statuses["bad topic"] == statuses["unknown field"] == statuses["NUL in data"] == 400


async def test_a_key_over_its_rate_gets_the_endpoints_429(api, monkeypatch):
    found = []
    for enabled, tag in ((True, "r1"), (False, "r2")):
        monkeypatch.setattr(ingest_fast, "_ENABLED", enabled)
        raw = (await sync_to_async(create_key)(f"slow-{tag}", rate="1/m"))[1]
        headers = {**JSON, "Authorization": f"Bearer {raw}"}
        body = json.dumps({"topic": f"fast.{tag}", "event": "e"}).encode()
        found.append([normalized(await api.post(URL, content=body, headers=headers), tag)[:2]
                      for _ in range(2)])  # fmt: skip
    assert found[0] == found[1]
    assert [status for status, _ in found[0]] == [202, 429]
    assert dict(found[0][1][1])["retry-after"]


async def test_a_well_formed_post_does_not_go_through_the_endpoint(api, ingest_key, monkeypatch):
    async def endpoint(*args):
        raise AssertionError("the fast path should have answered")

    monkeypatch.setattr(asgi_api.IngestASGIHandler, "__call__", endpoint)
    headers = {**JSON, "Authorization": f"Bearer {ingest_key}"}
    answer = await api.post(URL, json={"topic": "fast.only", "event": "e"}, headers=headers)
    assert answer.status_code == 202
    stored = await sync_to_async(list)(Notification.objects.values_list("topic__name", "seq"))
    assert stored == [("fast.only", 1)]
