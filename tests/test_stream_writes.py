"""The SQL under durable topic streams (routing_app/stream_writes.py): multi-topic batches keep
per-topic seqs gap-free under concurrency without deadlocks, and topics are (re)created."""

from __future__ import annotations

import random
import threading

import pytest
from django.db import connection

from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Notification, Topic


def batch(topics: list[str], size: int) -> list[NotificationIn]:
    return [NotificationIn(topic=random.choice(topics), event="tick") for _ in range(size)]


def seqs_by_topic() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for name, seq in Notification.objects.order_by("seq").values_list("topic__name", "seq"):
        found.setdefault(name, []).append(seq)
    return found


@pytest.mark.django_db(transaction=True)
def test_concurrent_multi_topic_batches_get_gap_free_seqs_without_deadlock():
    if connection.vendor != "postgresql":
        pytest.skip("row-lock concurrency is a Postgres property; SQLite serializes writers")
    topics = [f"multi.t{n}" for n in range(5)]
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(30):
                # shuffled topic order in each batch: locks must still be taken in name order
                ingest(batch(random.sample(topics, k=4), size=12))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors[0]
    found = seqs_by_topic()
    assert sum(len(s) for s in found.values()) == 4 * 30 * 12
    for name, seqs in found.items():
        assert seqs == list(range(1, len(seqs) + 1)), name
        assert Topic.objects.get(name=name).last_seq == len(seqs)


@pytest.mark.django_db(transaction=True)
def test_batch_to_a_topic_deleted_since_recreates_it_from_seq_1():
    ingest([NotificationIn(topic=t, event="e") for t in ("keep.a", "gone.b")] * 6)
    Topic.objects.filter(name="gone.b").delete()

    results = ingest([NotificationIn(topic=t, event="e") for t in ("keep.a", "gone.b")] * 6)

    assert [r.seq for r in results if r.topic == "gone.b"] == [1, 2, 3, 4, 5, 6]
    assert [r.seq for r in results if r.topic == "keep.a"] == [7, 8, 9, 10, 11, 12]
    assert seqs_by_topic()["gone.b"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are Postgres's")
@pytest.mark.django_db(transaction=True)
def test_the_stream_statements_run_prepared_on_postgres():
    """Both fixed statements are prepared once per connection, not parsed and planned per post."""
    ingest([NotificationIn(topic="prep.one", event="tick")])  # the one-topic statement
    ingest(batch(["prep.a", "prep.b"], 20))  # the lock of several topics, then COPY
    ingest([NotificationIn(topic="prep.one", event="tick")])

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert sum("INSERT INTO" in s and "routing_app_notification" in s for s in prepared) == 1
    assert sum("FOR UPDATE" in s and "routing_app_topic" in s for s in prepared) == 1
    assert seqs_by_topic()["prep.one"] == [1, 2]
