"""Group commit (routing_app/group_commit.py): concurrent posts share a transaction, and each
request still gets what it would get alone."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from routing_app.models import Notification
from tests.apiclient import bearer, create_key

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/v1/notifications"


def post(api, raw: str, n: int, **extra):
    return api.post(
        URL, json={"topic": f"group.t{n % 3}", "event": "tick", "data": {"n": n}, **extra},
        headers=bearer(raw),
    )  # fmt: skip


async def transactions_of_stored_rows() -> int:
    """How many transactions wrote the stored notifications (Postgres: distinct xmin)."""

    def count() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(DISTINCT xmin::text) FROM routing_app_notification")
            return cursor.fetchone()[0]

    return await sync_to_async(count)()


async def test_concurrent_posts_are_stored_together_with_their_own_seqs(api, ingest_key):
    answers = await asyncio.gather(*[post(api, ingest_key, n) for n in range(12)])

    assert [a.status_code for a in answers] == [202] * 12
    by_topic: dict[str, list[int]] = {}
    for answer in answers:
        by_topic.setdefault(answer.json()["topic"], []).append(answer.json()["seq"])
    assert {t: sorted(s) for t, s in by_topic.items()} == {
        f"group.t{n}": [1, 2, 3, 4] for n in range(3)
    }
    assert len({a.json()["id"] for a in answers}) == 12
    if connection.vendor == "postgresql":
        assert await transactions_of_stored_rows() < 12  # grouped: fewer transactions than posts


async def test_a_reused_key_with_another_body_fails_only_its_own_request(api, ingest_key):
    first = await post(api, ingest_key, 0, idempotency_key="dup")
    assert first.status_code == 202

    answers = await asyncio.gather(
        *[post(api, ingest_key, n) for n in range(1, 6)],
        post(api, ingest_key, 99, idempotency_key="dup"),  # same key, another body
    )

    assert [a.status_code for a in answers] == [202] * 5 + [422]
    assert answers[-1].json()["errors"][0]["loc"] == ["idempotency_key"]
    assert await Notification.objects.acount() == 6


async def test_a_key_over_its_rate_gets_429_while_another_key_in_the_same_group_passes(api):
    _, slow = await sync_to_async(create_key)("slow", rate="2/m")
    _, fast = await sync_to_async(create_key)("fast")

    answers = await asyncio.gather(
        *[post(api, slow, n) for n in range(4)], *[post(api, fast, n) for n in range(4)]
    )

    statuses = [a.status_code for a in answers]
    assert sorted(statuses[:4]) == [202, 202, 429, 429]
    assert statuses[4:] == [202] * 4
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)
    assert await Notification.objects.acount() == 6


async def test_racing_retries_in_one_group_store_one_row_and_mark_the_others_replayed(
    api, ingest_key
):
    answers = await asyncio.gather(
        *[post(api, ingest_key, 7, idempotency_key="once") for _ in range(5)]
    )

    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum("Idempotent-Replayed" not in a.headers for a in answers) == 1
    assert await Notification.objects.acount() == 1
