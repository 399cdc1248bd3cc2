"""Outbound delivery when the Celery broker is down: notifications ingested during the outage are
stored (202: Postgres is the truth) and, once the broker is back, the sweeper enqueues every one
and the worker delivers each exactly once. The broker is a Redis of the test's own
(``CELERY_BROKER_URL``), so the outage never touches the machine's shared one."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.peers import HTTPReceiver
from tests.servers import (
    CeleryWorker,
    NotifyServer,
    RedisServer,
    run_script,
    seed,
    server_environment,
    spawned,
)
from tests.test_delivery_worker import CONFIGURE

pytestmark = pytest.mark.timeout(180)


def test_notifications_ingested_while_the_broker_is_down_are_all_delivered(tmp_path):
    with (
        HTTPReceiver() as hooks,
        RedisServer(tmp_path) as broker,
        server_environment(
            tmp_path,
            "delivery_faults",
            CELERY_BROKER_URL=broker.url,
            SWEEP_INTERVAL_S="1",
            SWEEP_PENDING_GRACE_S="2",
        ) as env,
    ):
        key = seed(env)["api_key"]
        spec = {"webhook": ["webhook", hooks.url, "", {}, "#"]}
        run_script(env, CONFIGURE, json.dumps(spec))
        with spawned(
            [
                NotifyServer(env, tmp_path / "server.log"),
                CeleryWorker(env, tmp_path / "worker.log", beat=True),
            ]
        ) as (server, _):
            server.post(key, "jobs.nightly", "job.done", {"n": "before"})
            hooks.wait_for(1)  # the path works before the outage

            broker.kill()
            during = 10
            for n in range(during):
                assert server.post(key, "jobs.nightly", "job.done", {"n": n}) == n + 2  # 202
            broker.start()  # back, empty: the messages of the outage were never there

            received = hooks.wait_for(1 + during, timeout_s=60)
            got = Counter(r.json()["notification"]["data"]["n"] for r in received)
            assert got == Counter(["before", *range(during)])  # each exactly once
