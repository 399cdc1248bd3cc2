"""Ingest's deadline (routing_app/ingest_deadline.py): a post not committed by INGEST_DEADLINE_S
answers 503 with Retry-After, and its transaction, when the database answers again, rolls back
instead of committing; a commit sent but unconfirmed by then answers 504.

A database that does not answer is made here by another session holding the topic's row lock:
the post's transaction waits in ``Cursor.execute`` exactly as it does on a paused Postgres
(tests/chaos/test_postgres_faults.py pauses a real one).
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from django.db import DatabaseError, OperationalError, connection, connections

from routing_app.ingest import NotificationIn, aingest, check, persist
from routing_app.ingest_deadline import (
    CLOSED,
    COMMITTING,
    CommitInDoubt,
    CommitWindow,
    NotStored,
    answer_by_deadline,
    claim_commit,
    settle,
)
from routing_app.models import Notification
from tests.apiclient import bearer

URL = "/api/v1/notifications"


TOPIC = "workflow.deadline"  # a workflow source post of workflow "deadline" goes here too


def body(n: int, **extra) -> dict:
    return {"topic": TOPIC, "event": "tick", "data": {"n": n}, **extra}


async def seqs() -> list[int]:
    return [n.seq async for n in Notification.objects.order_by("seq")]


@pytest.fixture
def topic_locked():
    """Another session that holds the row lock of topic TOPIC until it is released
    (``release()``), so an ingest transaction of that topic waits in the database."""
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    session = psycopg.connect(**params)
    holding = {"on": False}

    def hold() -> None:
        session.execute("SELECT 1 FROM routing_app_topic WHERE name = %s FOR UPDATE", [TOPIC])
        holding["on"] = True

    def release() -> None:
        if holding["on"]:
            session.rollback()
            holding["on"] = False

    yield hold, release
    release()
    session.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="holds a row lock from a second Postgres session"
)
@pytest.mark.parametrize("kind", ["api", "source"])
async def test_a_post_the_database_does_not_answer_gets_503_and_never_commits_late(
    api, ingest_key, settings, topic_locked, kind
):
    settings.INGEST_DEADLINE_S = 1
    hold, release = topic_locked
    first = await api.post(URL, json=body(0), headers=bearer(ingest_key))
    assert first.status_code == 202 and first.json()["seq"] == 1
    await asyncio.to_thread(hold)
    if kind == "api":  # the group commit's path
        answer = await api.post(URL, json=body(1), headers=bearer(ingest_key))
    else:  # a source post goes alone (KEEP_FIRST)
        step = {"workflow": "deadline", "step": "one", "status": "started"}
        answer = await api.post("/api/v1/sources/workflow", json=step, headers=bearer(ingest_key))
    release()

    assert answer.status_code == 503, answer.text
    assert int(answer.headers["Retry-After"]) > 0
    assert "did not answer within 1 s" in answer.json()["detail"]
    # The next post of the topic waits for the abandoned transaction to end: seq 2 means it
    # rolled back (a late commit would have taken seq 2 itself).
    after = await api.post(URL, json=body(2), headers=bearer(ingest_key))
    assert after.status_code == 202 and after.json()["seq"] == 2, after.text
    assert await seqs() == [1, 2]


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="holds a row lock from a second Postgres session"
)
async def test_aingest_the_database_does_not_answer_raises_not_stored_and_never_commits_late(
    settings, topic_locked
):
    settings.INGEST_DEADLINE_S = 1
    hold, release = topic_locked
    [first] = await aingest([NotificationIn(topic=TOPIC, event="tick")])
    await asyncio.to_thread(hold)
    with pytest.raises(NotStored) as raised:
        await aingest([NotificationIn(topic=TOPIC, event="tick")])
    release()

    assert isinstance(raised.value, DatabaseError)  # what callers (a socket's publish) catch
    [after] = await aingest([NotificationIn(topic=TOPIC, event="tick")])
    assert (first.seq, after.seq) == (1, 2)  # the held one rolled back
    assert await seqs() == [1, 2]


def test_a_window_closed_by_its_deadline_refuses_the_commit():
    window = CommitWindow(time.monotonic() + 60)
    assert window.expire() == CLOSED
    with pytest.raises(NotStored):
        claim_commit([window])


def test_a_group_commits_only_if_every_window_is_open_and_in_time():
    late = CommitWindow(time.monotonic() - 0.001)  # its deadline passed; no one expired it yet
    in_time = CommitWindow(time.monotonic() + 60)
    with pytest.raises(NotStored):
        claim_commit([in_time, late])
    assert in_time.state == late.state == CLOSED  # both answer 503: neither was stored


def test_a_commit_claimed_first_is_in_doubt_at_the_deadline_then_settled():
    window = CommitWindow(time.monotonic() + 60)
    claim_commit([window])
    assert window.expire() == COMMITTING  # 504: sent, not confirmed
    settle([window])
    assert window.expire() == "done"


async def test_an_unconfirmed_commit_answers_504_at_the_deadline():
    window = CommitWindow(time.monotonic() + 0.05)
    claim_commit([window])  # COMMIT sent; its answer never comes
    with pytest.raises(CommitInDoubt) as raised:
        await answer_by_deadline(window, asyncio.get_running_loop().create_future())
    assert raised.value.status_code == 504 and raised.value.retry_after_s > 0
    assert "idempotency_key" in raised.value.message


async def test_an_unclaimed_request_answers_503_at_the_deadline_and_its_outcome_is_dropped():
    window = CommitWindow(time.monotonic() + 0.05)
    outcome = asyncio.get_running_loop().create_future()
    with pytest.raises(NotStored):
        await answer_by_deadline(window, outcome)
    assert outcome.cancelled() and window.state == CLOSED


@pytest.mark.django_db(transaction=True)
def test_a_connection_lost_during_the_commit_itself_is_in_doubt(monkeypatch):
    item = NotificationIn(topic="deadline.doubt", event="tick")
    check([item])
    window = CommitWindow(time.monotonic() + 60)

    def connection_lost() -> None:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(connections["default"], "commit", connection_lost)
    with pytest.raises(CommitInDoubt):
        persist([item], windows=[window])
    assert window.expire() == "done"  # settled: the waiting side hears the 504, not a 503
