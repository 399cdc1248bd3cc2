"""The Celery worker SIGKILLed mid-delivery, and then its broker killed and restarted empty while
notifications keep arriving: every delivery ends ``sent`` or ``dead``, with exactly one row per
notification and channel and its attempts recorded, none left ``sending``; the receiver sees each
sent one at least once (only calls in flight at the kill may arrive twice).

Builds on tests/test_delivery_worker.py (a worker killed alone) and tests/test_delivery_faults.py
(the broker down alone): here both faults hit one stream, and the figures are recorded. The
broker is a Redis of the test's own (CELERY_BROKER_URL); the sweeper (Celery beat in the worker)
re-enqueues from the database what the broker lost.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from tests.chaos.report import record
from tests.peers import HTTPReceiver, Reply
from tests.servers import (
    CeleryWorker,
    NotifyServer,
    RedisServer,
    run_script,
    seed,
    server_environment,
    spawned,
)
from tests.test_delivery_worker import CONFIGURE, wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

TOPIC = "jobs.chaos"
BEFORE, DURING = 20, 10  # notifications posted before the kill, and while the broker is away
HUNG = 3  # the first calls hang until the worker is dead


def deliveries(server: NotifyServer, key: str, notifications: set[str]) -> list[dict]:
    answer = httpx.get(
        f"{server.base}/api/v1/deliveries",
        params={"limit": 500, "channel": "webhook"},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return [d for d in answer.json()["deliveries"] if d["notification"] in notifications]


def notification_ids(server: NotifyServer, key: str) -> set[str]:
    answer = httpx.get(
        f"{server.base}/api/v1/topics/{TOPIC}/notifications",
        params={"limit": 1000},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return {n["id"] for n in answer.json()["notifications"]}


def attempt_logs(server: NotifyServer, key: str, notifications: set[str]) -> dict[int, list]:
    """Delivery id -> its attempt rows (``GET /api/v1/notifications/{id}``)."""
    logs = {}
    for notification in notifications:
        answer = httpx.get(
            f"{server.base}/api/v1/notifications/{notification}",
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        for delivery in answer.json()["deliveries"]:
            logs[delivery["id"]] = delivery["attempt_log"]
    return logs


def test_worker_killed_mid_delivery_then_broker_restarted_every_delivery_ends_once(tmp_path):
    with (
        HTTPReceiver() as hooks,
        RedisServer(tmp_path) as broker,
        server_environment(
            tmp_path,
            "worker_faults",
            CELERY_BROKER_URL=broker.url,
            SWEEP_INTERVAL_S="1",
            SWEEP_PENDING_GRACE_S="2",
            SWEEP_MARGIN_S="2",
        ) as env,
    ):
        key = seed(env)["api_key"]
        spec = {"webhook": ["webhook", hooks.url, "", {}, "jobs.#"]}
        run_script(env, CONFIGURE, json.dumps(spec))
        hooks.program(*[Reply(delay_s=4)] * HUNG)
        server = NotifyServer(env, tmp_path / "server.log")
        worker = CeleryWorker(env, tmp_path / "worker-1.log", name="first", beat=True)
        with spawned([server, worker]):
            try:
                for i in range(BEFORE):
                    server.post(key, TOPIC, "job.done", {"i": i})
                hooks.wait_for(1)  # a call is in flight
                worker.kill()
                broker.kill()
                for i in range(BEFORE, BEFORE + DURING):
                    server.post(key, TOPIC, "job.done", {"i": i})  # 202: Postgres is the truth
                broker.start()  # back, empty: every queued task is gone
                worker = CeleryWorker(env, tmp_path / "worker-2.log", name="second", beat=True)
                worker.start()
                ours = notification_ids(server, key)
                assert len(ours) == BEFORE + DURING

                def all_final() -> list[dict] | None:
                    rows = deliveries(server, key, ours)
                    final = all(d["status"] in ("sent", "dead") for d in rows)
                    return rows if final and {d["notification"] for d in rows} == ours else None

                rows = wait_until("every delivery sent or dead", all_final, timeout_s=120)
                logs = attempt_logs(server, key, ours)
            finally:
                worker.stop()
    per_notification = Counter(d["notification"] for d in rows)
    assert set(per_notification.values()) == {1}, "a notification got two delivery rows"
    assert all(d["attempts"] >= 1 for d in rows), "a delivery without a counted try"
    sent = {d["id"] for d in rows if d["status"] == "sent"}
    received = Counter(
        r.json()["delivery_id"] for r in hooks.requests.items if r.json()["delivery_id"] in sent
    )
    assert set(received) == sent, "a delivery marked sent never reached the receiver"
    outcomes = Counter(a["outcome"] for log in logs.values() for a in log)
    assert outcomes["started"] == 0, "an attempt left open"
    for delivery, calls in received.items():  # every call that reached the receiver has a row
        assert len(logs[delivery]) >= calls, (delivery, logs[delivery])
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= HUNG, "only calls in flight at the kill may be repeated"
    record(
        "worker killed mid-delivery, broker restarted empty",
        faults_injected=2,
        published=BEFORE + DURING,
        deliveries=len(rows),
        sent=len(sent),
        dead=sum(d["status"] == "dead" for d in rows),
        rows_per_notification=max(per_notification.values()),
        attempt_rows=sum(outcomes.values()),
        attempt_outcomes=dict(outcomes),
        tries_counted=sum(d["attempts"] for d in rows),
        received=sum(received.values()),
        received_twice=duplicates,
        lost=len(sent - set(received)),
    )
