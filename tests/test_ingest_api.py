"""The ingest HTTP API: 202 + seq after commit, idempotent retries, batches, history, and each error
status for its bad input. Requests go through the real ASGI application (middleware included)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.db import connection

from routing_app import apikeys, db_threads
from routing_app.models import ApiKey, Notification
from tests.apiclient import bearer, create_key
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/v1/notifications"


def body(**overrides) -> dict:
    return {"topic": "alerts.disk", "event": "disk.full", "data": {"pct": 97}, **overrides}


async def rows(**filters) -> list[tuple[str, int]]:
    query = Notification.objects.filter(**filters).order_by("topic__name", "seq")
    return await sync_to_async(list)(query.values_list("topic__name", "seq"))


# --- accepted -----------------------------------------------------------------------------------


async def test_post_answers_202_with_id_topic_and_seq_of_the_stored_row(api, ingest_key):
    first = await api.post(URL, json=body(), headers=bearer(ingest_key))
    second = await api.post(URL, json=body(severity="warning"), headers=bearer(ingest_key))

    assert first.status_code == 202, first.text
    assert first.json()["topic"] == "alerts.disk" and first.json()["seq"] == 1
    assert second.json()["seq"] == 2
    stored = await Notification.objects.aget(pk=first.json()["id"])
    assert (stored.event, stored.data, stored.source) == ("disk.full", {"pct": 97}, "api")


async def test_retry_with_same_idempotency_key_gets_first_answer_and_stores_once(api, ingest_key):
    payload = body(idempotency_key="disk-full-1")
    first = await api.post(URL, json=payload, headers=bearer(ingest_key))
    retry = await api.post(URL, json=payload, headers=bearer(ingest_key))

    assert first.status_code == retry.status_code == 202
    assert retry.json() == first.json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await rows() == [("alerts.disk", 1)]


async def test_racing_retries_with_one_key_store_one_row_and_get_one_answer(api, ingest_key):
    if connection.vendor != "postgresql":
        pytest.skip("concurrent writers need Postgres; SQLite serializes them")
    payload = body(idempotency_key="race-1")
    answers = await asyncio.gather(
        *[api.post(URL, json=payload, headers=bearer(ingest_key)) for _ in range(8)]
    )

    assert {a.status_code for a in answers} == {202}
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1
    assert sum(1 for a in answers if "Idempotent-Replayed" not in a.headers) == 1
    assert await rows() == [("alerts.disk", 1)]


async def test_batch_stores_all_in_order_with_per_item_answers(api, ingest_key):
    await api.post(URL, json=body(idempotency_key="k-old"), headers=bearer(ingest_key))
    items = [body(), body(topic="alerts.cpu"), body(idempotency_key="k-old"), body()]

    answer = await api.post(
        f"{URL}/batch", json={"notifications": items}, headers=bearer(ingest_key)
    )

    assert answer.status_code == 202, answer.text
    results = answer.json()["results"]
    assert [(r["topic"], r["seq"], r["replayed"]) for r in results] == [
        ("alerts.disk", 2, False),
        ("alerts.cpu", 1, False),
        ("alerts.disk", 1, True),
        ("alerts.disk", 3, False),
    ]
    assert await rows() == [
        ("alerts.cpu", 1),
        ("alerts.disk", 1),
        ("alerts.disk", 2),
        ("alerts.disk", 3),
    ]


async def test_large_batch_stores_every_item_and_its_data_with_consecutive_seqs(api, ingest_key):
    items = [
        body(topic=f"bulk.t{n % 3}", data={"n": n, "text": 'naïve ☃ "quoted"\ttab\\'})
        for n in range(25)
    ]  # more than stream_writes.STATEMENT_MAX_ROWS: the COPY path on Postgres

    answer = await api.post(
        f"{URL}/batch", json={"notifications": items}, headers=bearer(ingest_key)
    )

    assert answer.status_code == 202, answer.text
    results = answer.json()["results"]
    assert [r["seq"] for r in results] == [n // 3 + 1 for n in range(25)]
    stored = await sync_to_async(list)(
        Notification.objects.order_by("topic__name", "seq").values_list("topic__name", "data")
    )
    assert len(stored) == 25
    assert stored[0] == ("bulk.t0", {"n": 0, "text": 'naïve ☃ "quoted"\ttab\\'})


async def test_batch_with_one_bad_item_stores_nothing_and_names_the_item(api, ingest_key):
    items = [body(), body(topic="Not A Topic"), body()]

    answer = await api.post(
        f"{URL}/batch", json={"notifications": items}, headers=bearer(ingest_key)
    )

    assert answer.status_code == 400
    assert [e["loc"] for e in answer.json()["errors"]] == [["notifications", 1, "topic"]]
    assert await rows() == []


async def test_history_returns_envelopes_after_a_seq_in_order(api, ingest_key):
    for n in range(5):
        await api.post(URL, json=body(data={"n": n}), headers=bearer(ingest_key))

    page = await api.get(
        "/api/v1/topics/alerts.disk/notifications?after=1&limit=3", headers=bearer(ingest_key)
    )

    assert page.status_code == 200
    history = page.json()
    assert [(n["seq"], n["data"]["n"]) for n in history["notifications"]] == [
        (2, 1),
        (3, 2),
        (4, 3),
    ]
    assert history["next_after"] == 4 and history["last_seq"] == 5
    first = history["notifications"][0]
    assert set(first) == {"type", "topic", "seq", "id", "event", "data", "severity", "source", "ts"}


async def test_history_of_a_topic_without_notifications_is_empty(api, ingest_key):
    page = await api.get("/api/v1/topics/nothing.here/notifications", headers=bearer(ingest_key))
    assert page.status_code == 200
    assert page.json() == {
        "topic": "nothing.here",
        "last_seq": 0,
        "notifications": [],
        "next_after": 0,
    }


async def test_key_use_is_recorded_in_last_used_at(api, ingest_key):
    await api.post(URL, json=body(), headers=bearer(ingest_key))
    key = await ApiKey.objects.aget(name="ingest-client")
    assert key.last_used_at is not None


async def test_ingest_answers_carry_cors_and_nosniff_headers(api, ingest_key):
    origin = "http://localhost:3000"  # a NOTIFY_ALLOWED_ORIGINS default
    answer = await api.post(URL, json=body(), headers={**bearer(ingest_key), "Origin": origin})
    preflight = await api.options(
        URL,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )

    assert answer.status_code == 202
    assert answer.headers["Access-Control-Allow-Origin"] == origin
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]


async def test_openapi_schema_and_docs_are_served(api):
    schema = await api.get("/api/v1/openapi.json")
    docs = await api.get("/api/v1/docs")

    assert schema.status_code == 200 and docs.status_code == 200
    paths = schema.json()["paths"]
    assert {
        "/api/v1/notifications",
        "/api/v1/notifications/batch",
        "/api/v1/sources/alertmanager",
    } <= set(paths)


# --- errors: each status for its bad input ---------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        (body(topic="Alerts Disk!"), ["topic"]),
        (body(event=""), ["event"]),
        ({"topic": "alerts.disk"}, ["event"]),
        (body(data=[1, 2]), ["data"]),
        (body(severity="urgent"), ["severity"]),
        (body(source="mainframe"), ["source"]),
        (body(recipients="ops@example.com"), ["recipients"]),
        (body(sevrity="info"), ["sevrity"]),
        ([body()], []),
    ],
)
async def test_bad_field_gets_400_with_its_json_path(api, ingest_key, payload, loc):
    answer = await api.post(
        URL,
        content=json.dumps(payload),
        headers={**bearer(ingest_key), "Content-Type": "application/json"},
    )

    assert answer.status_code == 400, answer.text
    assert loc in [e["loc"] for e in answer.json()["errors"]], answer.json()
    assert all(e["msg"] for e in answer.json()["errors"])
    assert await rows() == []


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ('{"topic": "a.b", "event": "e", "data": {"x": NaN}}', ["data"]),
        ('{"topic": "a.b", "event": "e", "data": {"x": Infinity}}', ["data"]),
        ('{"topic": "a.b", "event": "e", "data": {"x": "nul \\u0000 here"}}', ["data"]),
        ('{"topic": "a.b", "event": "e", "data": {"x\\u0000": 1}}', ["data"]),
        ('{"topic": "a.b", "event": "e", "data": {"x": "\\ud800"}}', ["data"]),
        ('{"topic": "a.b", "event": "e\\u0000"}', ["event"]),
        ('{"topic": "a.b", "event": "e", "idempotency_key": "k\\udfff"}', ["idempotency_key"]),
        (
            '{"topic": "a.b", "event": "e", "recipients": ["x\\u0000@example.com"]}',
            ["recipients", 0],
        ),
    ],
)
async def test_json_the_database_cannot_store_gets_400_not_500(api, ingest_key, raw, loc):
    answer = await api.post(
        URL, content=raw, headers={**bearer(ingest_key), "Content-Type": "application/json"}
    )

    assert answer.status_code == 400, answer.text
    assert loc in [e["loc"] for e in answer.json()["errors"]]
    assert await rows() == []


async def test_body_that_is_not_json_gets_400(api, ingest_key):
    for raw in (b"{not json", b"\xff\xfe", b""):
        answer = await api.post(
            URL, content=raw, headers={**bearer(ingest_key), "Content-Type": "application/json"}
        )
        assert answer.status_code == 400, (raw, answer.text)
        assert answer.json()["detail"]


async def test_missing_malformed_unknown_or_revoked_key_gets_401(api, ingest_key):
    revoked_row, revoked = await sync_to_async(create_key)("old", revoked=True)
    cases = [
        {},
        {"Authorization": "Basic dXNlcjpwdw=="},
        {"Authorization": "Bearer "},
        bearer("not-a-key"),
        bearer(ingest_key[:-2] + "xx"),
        bearer("nk_ffffffff_secret"),
        bearer(revoked),
    ]
    for headers in cases:
        answer = await api.post(URL, json=body(), headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["detail"]
    assert await rows() == []


async def test_revoking_a_key_takes_effect_in_this_process_at_once(api, ingest_key):
    assert (await api.post(URL, json=body(), headers=bearer(ingest_key))).status_code == 202
    key = await ApiKey.objects.aget(name="ingest-client")
    key.revoked = True
    await key.asave()

    answer = await api.post(URL, json=body(), headers=bearer(ingest_key))

    assert answer.status_code == 401 and "revoked" in answer.json()["detail"]


async def test_key_without_scope_source_or_topic_right_gets_403_saying_which(api, transactional_db):
    _, tokens_only = await sync_to_async(create_key)("tokens", scopes=["tokens"])
    _, k8s_only = await sync_to_async(create_key)(
        "k8s", allowed_sources=["k8s"], allowed_topics="k8s.#"
    )
    cases = [
        (tokens_only, body(), "'ingest' scope"),
        (k8s_only, body(source="k8s"), "topic 'alerts.disk'"),
        (k8s_only, body(topic="k8s.prod.pod"), "source 'api'"),
    ]
    for raw, payload, reason in cases:
        answer = await api.post(URL, json=payload, headers=bearer(raw))
        assert answer.status_code == 403, answer.text
        assert reason in answer.json()["detail"]
    history = await api.get("/api/v1/topics/alerts.disk/notifications", headers=bearer(k8s_only))
    assert history.status_code == 403
    ok = await api.post(
        URL, json=body(topic="k8s.prod.pod", source="k8s"), headers=bearer(k8s_only)
    )
    assert ok.status_code == 202
    assert await rows() == [("k8s.prod.pod", 1)]


async def test_body_over_64_kb_gets_413(api, ingest_key):
    payload = json.dumps(body(data={"blob": "x" * (64 * 1024)}))
    answer = await api.post(
        URL, content=payload, headers={**bearer(ingest_key), "Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    assert "limit" in answer.json()["detail"]
    assert await rows() == []


async def test_body_that_is_not_declared_json_gets_415(api, ingest_key):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = bearer(ingest_key)
        if content_type:
            headers["Content-Type"] = content_type
        answer = await api.post(URL, content=json.dumps(body()), headers=headers)
        assert answer.status_code == 415, (content_type, answer.text)
    assert await rows() == []


async def test_reused_idempotency_key_with_other_body_gets_422(api, ingest_key):
    await api.post(URL, json=body(idempotency_key="k1"), headers=bearer(ingest_key))

    answer = await api.post(
        URL, json=body(idempotency_key="k1", data={"pct": 12}), headers=bearer(ingest_key)
    )

    assert answer.status_code == 422
    assert answer.json()["errors"][0]["loc"] == ["idempotency_key"]
    assert await rows() == [("alerts.disk", 1)]


async def test_key_over_its_rate_gets_429_with_retry_after(api, transactional_db):
    _, raw = await sync_to_async(create_key)("slow", rate="2/m")
    statuses = [(await api.post(URL, json=body(), headers=bearer(raw))) for _ in range(3)]

    assert [s.status_code for s in statuses] == [202, 202, 429]
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 60
    assert await rows() == [("alerts.disk", 1), ("alerts.disk", 2)]


@pytest.mark.skipif(not settings.REDIS_URL, reason="the shared counter lives in Redis")
def test_a_keys_counter_is_shared_and_expires_after_its_window(db):
    """The counter every process of every host adds to: one integer key per key and window
    (what ``cache.incr`` keeps), created with the window's lifetime so it never outlives it."""
    prefix = uuid.uuid4().hex[:8]
    key = apikeys.KeyInfo(1, "k", prefix, "", frozenset(), frozenset(), (), "3/m", False)
    assert [apikeys.take(key)[0] for _ in range(4)] == [1, 1, 1, 0]
    assert apikeys.take(key, 5)[0] == 0

    cache = caches[settings.RATELIMIT_USE_CACHE]
    [name] = cache.keys(f"rate:*:{prefix}:*")
    assert cache.get(name) == 9
    assert 0 < cache.ttl(name) <= 60 + apikeys.RATE_KEY_FUDGE_S


async def test_batch_item_with_data_over_64_kb_gets_400_naming_it(api, ingest_key):
    items = [body(), body(data={"blob": "x" * (64 * 1024)})]
    answer = await api.post(
        f"{URL}/batch", json={"notifications": items}, headers=bearer(ingest_key)
    )
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["loc"] == ["notifications", 1, "data"]
    assert "limit" in answer.json()["errors"][0]["msg"]


async def test_batch_over_1000_items_gets_400(api, ingest_key):
    items = [{"topic": "a.b", "event": "e"}] * 1001
    answer = await api.post(
        f"{URL}/batch", json={"notifications": items}, headers=bearer(ingest_key)
    )
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["loc"] == ["notifications"]


async def test_history_with_bad_query_or_topic_gets_400(api, ingest_key):
    for path in (
        "alerts.disk/notifications?limit=0",
        "alerts.disk/notifications?after=x",
        "Bad!/notifications",
    ):
        answer = await api.get(f"/api/v1/topics/{path}", headers=bearer(ingest_key))
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["errors"][0]["loc"]


async def test_unreachable_database_gets_503_with_retry_after_and_stores_nothing(api, ingest_key):
    assert (await api.post(URL, json=body(), headers=bearer(ingest_key))).status_code == 202
    settings_dict = connection.settings_dict
    saved = dict(settings_dict)
    if connection.vendor == "postgresql":
        settings_dict.update(HOST="127.0.0.1", PORT=str(free_port()))
    else:  # SQLite: a database file that cannot be opened
        settings_dict["NAME"] = "/nonexistent-dir/notify.sqlite3"
    await sync_to_async(db_threads.close_all)()  # pool threads reconnect with the broken settings
    try:
        post = await api.post(URL, json=body(), headers=bearer(ingest_key))
        history = await api.get(
            "/api/v1/topics/alerts.disk/notifications", headers=bearer(ingest_key)
        )
    finally:
        settings_dict.clear()
        settings_dict.update(saved)
        await sync_to_async(db_threads.close_all)()

    for answer in (post, history):
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) > 0
    recovered = await api.post(URL, json=body(), headers=bearer(ingest_key))
    assert recovered.status_code == 202 and recovered.json()["seq"] == 2
    assert await rows() == [("alerts.disk", 1), ("alerts.disk", 2)]


# --- what every endpoint answers in JSON ----------------------------------------------------


async def test_recipient_longer_than_a_delivery_can_hold_gets_400_naming_it(api, ingest_key):
    payload = body(recipients=["ops@example.com", "a" * 490 + "@example.com"])
    answer = await api.post(URL, json=payload, headers=bearer(ingest_key))
    assert answer.status_code == 400, answer.text
    assert answer.json()["errors"][0]["loc"] == ["recipients", 1]
    assert await rows() == []


async def test_a_query_value_the_database_refuses_gets_400_in_json(api, transactional_db):
    _, raw = await sync_to_async(create_key)("reader", scopes=["deliveries"])
    answer = await api.get("/api/v1/deliveries?channel=e%00mail", headers=bearer(raw))
    assert answer.status_code == 400, answer.text
    assert "NUL" in answer.json()["detail"]


async def test_a_form_body_over_the_upload_limit_gets_413_in_json(api):
    form = "MessageSid=" + "x" * (3 * 1024 * 1024)
    answer = await api.post(
        "/api/v1/providers/1/receipts",
        content=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 413, answer.text
    assert "limit" in answer.json()["detail"]


async def test_a_form_with_too_many_fields_gets_400_in_json(api):
    form = "&".join(f"f{n}=x" for n in range(1001))  # over DATA_UPLOAD_MAX_NUMBER_FIELDS
    answer = await api.post(
        "/api/v1/providers/1/receipts",
        content=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 400, answer.text
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in answer.json()["detail"]
