"""The end-to-end harness (tests/servers.py, tests/peers.py) works: each piece started for real
and used the way the end-to-end tests use it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import httpx
import pytest
from django.core import mail

from routing_app.management.commands.serve import uvicorn_argv
from tests.peers import HTTPReceiver, Reply, SMTPServer
from tests.servers import (
    CeleryWorker,
    NotifyServer,
    RedisServer,
    run_script,
    seed,
    server_environment,
)

pytestmark = pytest.mark.skipif(
    not shutil.which("redis-server"), reason="redis-server is not installed"
)

INGEST_SCRIPT = """
import sys
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Topic
topic, count, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ingest([NotificationIn(topic=topic, event="tick", data={"n": n}) for n in range(count)])
Topic.objects.filter(name=topic).update(retention_count=keep)
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("servers-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def environment(tmp_path_factory, redis_server) -> Iterator[tuple[dict[str, str], dict]]:
    """(env, what seed made): a seeded database of its own and the module's redis-server."""
    directory = tmp_path_factory.mktemp("servers")
    with server_environment(directory, "servers", REDIS_URL=redis_server.url) as env:
        yield env, seed(env)


def test_redis_server_comes_back_empty_on_the_same_port(redis_server):
    client = redis_server.client()
    client.set("kept", "no")
    port = redis_server.port
    redis_server.kill()
    redis_server.start()
    assert redis_server.port == port
    assert client.get("kept") is None  # no persistence: a restart is a crashed cache


@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")),
    reason="seeded databases are copied from a template on Postgres only",
)
def test_seeded_databases_are_copies_with_the_same_personas_each_its_own(tmp_path):
    import psycopg

    with (
        server_environment(tmp_path / "a", "servers_copy_a") as env_a,
        server_environment(tmp_path / "b", "servers_copy_b") as env_b,
    ):
        seeded = [seed(env_a), seed(env_b)]
        with (
            psycopg.connect(env_a["DATABASE_URL"]) as a,
            psycopg.connect(env_b["DATABASE_URL"]) as b,
        ):
            a.execute("UPDATE auth_user SET first_name = 'changed' WHERE username = 'sam'")
            names = [
                conn.execute("SELECT first_name FROM auth_user WHERE username = 'sam'").fetchone()
                for conn in (a, b)
            ]
    assert seeded[0] == seeded[1]  # one seed, copied: the same key, tokens and session
    assert names == [("changed",), ("",)]  # a change in one copy stays in it


def test_notify_server_runs_serves_command_line_and_restarts_on_its_port(environment, tmp_path):
    env, seeded = environment
    server = NotifyServer(env, tmp_path / "uvicorn.log")
    assert server.argv == [*uvicorn_argv("127.0.0.1", server.port), "--log-level=warning"]
    try:
        server.start()
        assert server.hub_stats(seeded["api_key"])["subscribers"] == 0
        assert server.post(seeded["api_key"], "servers.first", "tick", {}) == 1
        server.kill()
        with pytest.raises(httpx.TransportError):
            httpx.get(server.base, timeout=5)
        server.start()
        assert server.post(seeded["api_key"], "servers.first", "tick", {}) == 2
    finally:
        server.stop()


def test_celery_worker_runs_a_project_task_on_its_database_and_stops_cleanly(environment, tmp_path):
    env, _ = environment
    run_script(env, INGEST_SCRIPT, "servers.trimmed", "3", "1")
    worker = CeleryWorker(env, tmp_path / "celery.log")
    worker.start()
    try:
        worker.send_task("routing_app.tasks.trim_retention_all")
        done = worker.wait_for_line(
            lambda line: "trim_retention_all" in line and "succeeded" in line
        )
        assert done.endswith(": 2")  # the task's result: 2 of the 3 rows deleted
    finally:
        assert worker.stop() == 0


def test_smtp_server_keeps_what_djangos_smtp_backend_sends():
    with SMTPServer() as smtp:
        connection = mail.get_connection(
            "django.core.mail.backends.smtp.EmailBackend", host="127.0.0.1", port=smtp.port
        )
        sent = mail.EmailMessage(
            "Pod crashed", "api-1 restarted 3 times", "notify@example.com", ["sam@example.com"]
        )
        assert connection.send_messages([sent]) == 1
        [message] = smtp.wait_for(1)
    assert message["Subject"] == "Pod crashed"
    assert message.get_content().strip() == "api-1 restarted 3 times"
    assert smtp.envelopes == [("notify@example.com", ["sam@example.com"])]


def test_http_receiver_records_requests_and_answers_as_programmed():
    with HTTPReceiver() as receiver:
        receiver.program(Reply(503, b"busy", {"Retry-After": "1"}))
        first = httpx.post(f"{receiver.url}/sms", json={"to": "+100"}, timeout=10)
        second = httpx.post(f"{receiver.url}/sms", json={"to": "+200"}, timeout=10)
        assert (first.status_code, first.text, first.headers["Retry-After"]) == (503, "busy", "1")
        assert second.status_code == 200  # the default once the program is used up
        [one, two] = receiver.wait_for(2)
    assert (one.method, one.path, one.json(), two.json()) == (
        "POST",
        "/sms",
        {"to": "+100"},
        {"to": "+200"},
    )
    assert one.headers["Content-Type"] == "application/json"


def test_http_receiver_holds_a_delayed_answer_past_the_clients_timeout():
    with HTTPReceiver() as receiver:
        receiver.program(Reply(200, delay_s=60))  # far beyond the client's 1 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{receiver.url}/hook", content=b"{}", timeout=1)
        [held] = receiver.wait_for(1)
    assert held.body == b"{}"
