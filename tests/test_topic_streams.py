"""Durable topic streams: gap-free seq under concurrency, idempotency, retention."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from routing_app.ingest import IdempotencyConflict, IngestError, NotificationIn, ingest
from routing_app.models import Notification, Topic


def item(topic="alerts.k8s", **kw) -> NotificationIn:
    return NotificationIn(topic=topic, event=kw.pop("event", "pod.crash"), **kw)


@pytest.mark.django_db
def test_first_notification_creates_topic_with_seq_1():
    [result] = ingest([item()])
    assert result.seq == 1 and result.created
    assert Topic.objects.get(name="alerts.k8s").last_seq == 1


@pytest.mark.django_db
def test_batch_takes_consecutive_seqs_per_topic():
    results = ingest([item("a.b"), item("c.d"), item("a.b"), item("a.b")])
    assert [(r.topic, r.seq) for r in results] == [("a.b", 1), ("c.d", 1), ("a.b", 2), ("a.b", 3)]


@pytest.mark.django_db
def test_invalid_item_stores_nothing_and_names_the_field():
    with pytest.raises(IngestError) as exc:
        ingest([item(), item(topic="Bad Topic!")])
    assert exc.value.errors[0]["loc"] == [1, "topic"]
    assert Notification.objects.count() == 0


@pytest.mark.django_db
def test_same_idempotency_key_returns_first_answer():
    first = ingest([item(idempotency_key="k1", data={"x": 1})])[0]
    again = ingest([item(idempotency_key="k1", data={"x": 1})])[0]
    assert (again.id, again.seq, again.created) == (first.id, first.seq, False)
    assert Notification.objects.count() == 1


@pytest.mark.django_db
def test_same_idempotency_key_with_other_body_is_refused():
    ingest([item(idempotency_key="k1", data={"x": 1})])
    with pytest.raises(IdempotencyConflict):
        ingest([item(idempotency_key="k1", data={"x": 2})])


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_get_gap_free_seqs():
    if connection.vendor != "postgresql":
        pytest.skip("row-lock concurrency is a Postgres property; SQLite serializes writers")
    writers, per_writer = 8, 200
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(per_writer):
                ingest([item("race.topic")])
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    seqs = sorted(
        Notification.objects.filter(topic__name="race.topic").values_list("seq", flat=True)
    )
    assert seqs == list(range(1, writers * per_writer + 1))


@pytest.mark.django_db(transaction=True)
def test_racing_requests_with_one_idempotency_key_store_one_row():
    if connection.vendor != "postgresql":
        pytest.skip("needs concurrent Postgres transactions")
    barrier = threading.Barrier(6)
    answers = []

    def post() -> None:
        try:
            barrier.wait()
            answers.append(ingest([item(idempotency_key="same", data={"n": 1})])[0].answer())
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 6 and all(a == answers[0] for a in answers)
    assert Notification.objects.filter(idempotency_key="same").count() == 1
