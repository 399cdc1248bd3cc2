"""Overload: publishing open-loop faster than 1,000 clients read, for 10 s.

A real uvicorn process in Redis mode (its own redis-server, with a small pub/sub output buffer
limit so that falling behind also costs the hub its Redis connection mid-stream); a separate
publisher process ingests at a fixed rate whatever happens; 1,000 clients in a third process
(tests/ws_load.py), 100 of which read far slower than the publisher. At the end, every client is
either still connected with every seq exactly once and in order, or was closed with 4429; the
server's memory growth stays within what its bounded queues allow. Then all 1,000 connections
drop at once, and no subscription is left in the process or in Redis: a publish reaches nobody.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.servers import ROOT, NotifyServer, RedisServer, python_argv, seed, server_environment

CLIENTS = 1000
SLOW_CLIENTS = 100
PUBLISH_RATE = 40  # notifications per second, open-loop (not waiting for anyone)
PUBLISH_S = 10
SEND_QUEUE = 64  # SOCKET_SEND_QUEUE of the server under test (frames per socket)
PAD_BYTES = 2048  # notification payload size
TOPIC = "load.overload"
# What the server may hold per socket at most: its queue of shared frames (an event dict each),
# the transport's write buffer above the high-water mark (64 KiB, uvloop) and one frame.
PER_SOCKET_BOUND = SEND_QUEUE * 400 + 64 * 1024 + 2 * 1024
BASE_SLACK = 96 * 1024 * 1024  # interpreter growth under load (allocator, DB rows, Redis buffers)

PUBLISHER = """
import sys, time
from routing_app.ingest import NotificationIn, ingest
rate, duration, pad, topic = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.monotonic()
last = 0
n = 0
while n < rate * duration:
    due = start + n / rate
    wait = due - time.monotonic()
    if wait > 0:
        time.sleep(wait)  # open loop: the schedule is fixed; a late tick publishes at once
    [r] = ingest([NotificationIn(topic=topic, event="load", data={"n": n, "pad": "x" * pad})])
    last = r.seq
    n += 1
print("FINAL", last, flush=True)
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def overload_server(tmp_path_factory):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("overload")
    # Pub/sub clients over 1 MB behind are cut by Redis: the hub must reconnect and back-fill.
    pubsub_limit = ("--client-output-buffer-limit", "pubsub", "1mb", "512kb", "1")
    with (
        RedisServer(tmp, *pubsub_limit) as redis_server,
        server_environment(
            tmp,
            "overload",
            REDIS_URL=redis_server.url,
            REDIS_PREFIX="overload",
            SOCKET_SEND_QUEUE=str(SEND_QUEUE),
        ) as env,
    ):
        seeded = seed(env)
        users = {**seeded["ids"], "api_key": seeded["api_key"]}
        server = NotifyServer(env, tmp / "uvicorn.log")
        try:
            server.start()
            yield server, redis_server, env, users
        finally:
            server.stop()


def test_overload_drops_slow_readers_and_keeps_everyone_else_whole(overload_server):
    server, redis_server, env, users = overload_server
    clients = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.ws_load",
            f"--port={server.port}",
            f"--topic={TOPIC}",
            f"--token={server.token(users['sam'])}",
            f"--clients={CLIENTS}",
            f"--slow={SLOW_CLIENTS}",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = read_line(clients, "READY")
        assert ready["subscribed"] == CLIENTS, ready
        stats = server.hub_stats(users["api_key"])
        assert (stats["topics"], stats["subscribers"]) == (1, CLIENTS)
        rss_before = server.rss_bytes()

        publisher = subprocess.Popen(
            python_argv(PUBLISHER, str(PUBLISH_RATE), str(PUBLISH_S), str(PAD_BYTES), TOPIC),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        rss_peak = rss_before
        while publisher.poll() is None:  # sample the server's memory while it is flooded
            rss_peak = max(rss_peak, server.rss_bytes())
            time.sleep(0.1)
        assert publisher.returncode == 0
        final = int(publisher.stdout.read().split()[1])
        assert final == PUBLISH_RATE * PUBLISH_S

        clients.stdin.write(f"FINAL {final}\n")
        clients.stdin.flush()
        result = read_line(clients, "RESULT")
        rss_peak = max(rss_peak, server.rss_bytes())
        stats = server.hub_stats(users["api_key"])
        print(f"overload: {result} rss growth {(rss_peak - rss_before) >> 20} MiB, hub {stats}")

        assert result["violations"] == []  # no gap, duplicate or reorder on any socket
        assert result["incomplete_open"] == []  # connected = has every seq
        # Disconnected = closed with 4429, or (for a reader too slow to even reach that close
        # frame within the server's grace) aborted after it was sent.
        closes = result["closed"]
        assert set(closes) <= {"slow:4429", "fast:4429", "slow:lost", "fast:lost"}, closes
        assert closes.get("slow:4429", 0) + closes.get("slow:lost", 0) == SLOW_CLIENTS, result
        assert closes.get("slow:4429", 0) >= SLOW_CLIENTS // 2, result
        assert result["complete"]["fast"] >= (CLIENTS - SLOW_CLIENTS) // 2, result
        assert rss_peak - rss_before < CLIENTS * PER_SOCKET_BOUND + BASE_SLACK

        clients.stdin.write("CLOSE\n")
        clients.stdin.flush()
        read_line(clients, "CLOSED")
        assert_nothing_subscribed(server, redis_server, users["api_key"])
    finally:
        clients.kill()
        clients.wait(timeout=10)


def assert_nothing_subscribed(server, redis_server, api_key: str) -> None:
    """The hub forgot every socket, holds no Redis subscription, and a publish reaches nobody."""
    deadline = time.monotonic() + 30
    while server.hub_stats(api_key)["subscribers"]:  # the server sees the drops as they come
        assert time.monotonic() < deadline, server.hub_stats(api_key)
        time.sleep(0.1)
    stats = server.hub_stats(api_key)
    assert (stats["topics"], stats["redis_channels"]) == (0, 0), stats
    redis = redis_server.client()
    while redis.pubsub_channels("overload:hub:*"):
        assert time.monotonic() < deadline, redis.pubsub_channels("overload:*")
        time.sleep(0.1)
    assert redis.pubsub_numsub(f"overload:hub:{TOPIC}") == [(f"overload:hub:{TOPIC}".encode(), 0)]
    assert redis.publish(f"overload:hub:{TOPIC}", b"{}") == 0  # costs nothing: no receiver


def read_line(proc: subprocess.Popen, word: str) -> dict:
    line = proc.stdout.readline()
    assert line.startswith(word + " "), f"expected {word}, got {line!r} (exit {proc.poll()})"
    return json.loads(line[len(word) + 1 :])
