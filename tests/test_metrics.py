"""Metrics: the figures computed from recorded histograms, ``/metrics``' protection, what the
realtime edge records, host snapshots, and a real scrape that sums two server processes and a
Celery worker (a killed process's live gauges leave the sum, its counters stay).

Recorded values are read back the way Prometheus reads them: this process's through the host
collector (``files.HostCollector``), the servers' from ``GET /metrics`` parsed by
prometheus-client's own parser. Tests compare increases, never absolute values, where other
tests of this process may have recorded before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from channels_app import edge_metrics, socket_auth, tokens
from channels_app.hub import hub
from channels_app.presence import get_presence
from channels_app.routing import websocket_application
from routing_app.ingest import NotificationIn, ingest
from routing_app.metrics import figures, instruments, snapshot
from routing_app.metrics.files import HostCollector
from routing_app.metrics.instruments import LATENCY_BUCKETS, topic_namespace
from tests.peers import HTTPReceiver
from tests.servers import (
    CeleryWorker,
    NotifyServer,
    run_script,
    seed,
    server_environment,
    spawned,
)

WAIT_S = 20  # upper bound for one awaited event; passing runs take far less
TOKEN = "metrics-test-token"  # noqa: S105  (a test's own bearer token)

Samples = list[tuple[str, dict[str, str], float]]


# --- reading samples ----------------------------------------------------------------------------


def local_samples() -> Samples:
    """Every sample this host's processes of the test role recorded (this process's included,
    its pending fanout figures flushed first)."""
    edge_metrics.flush()
    return [(s.name, s.labels, s.value) for fam in HostCollector().collect() for s in fam.samples]


def parse(text: str) -> Samples:
    """Prometheus' text format, read with prometheus-client's parser."""
    return [
        (s.name, s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


def snap(host: str, at: float, samples: Samples) -> dict:
    return {"host": host, "at": at, "samples": [[n, dict(lb), v] for n, lb, v in samples]}


def exact_quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``: the smallest value with at least q of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bucket_bounds(value: float) -> tuple[float, float]:
    """(lower, upper] of the histogram bucket that holds ``value``."""
    lower = 0.0
    for upper in (*LATENCY_BUCKETS, math.inf):
        if value <= upper:
            return lower, upper
        lower = upper
    raise AssertionError("unreachable")


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' ``histogram_quantile`` over cumulative ``{le: count}`` (its documented rule:
    linear within the bucket of rank q * count; above the highest finite bound, that bound)."""
    bounds = sorted(buckets)
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (buckets[le] - below)
        lower, below = le, buckets[le]
    raise AssertionError("unreachable")


def latencies(n: int = 2000) -> list[float]:
    """Deterministic delivery latencies: most a few ms, a tail into seconds."""
    rng = random.Random(20261203)  # noqa: S311  (a fixed sample, not a secret)
    return [rng.lognormvariate(math.log(0.02), 1.2) for _ in range(n)]


# --- units: topic namespaces, quantiles, merge ----------------------------------------------------


def test_topic_namespace_is_the_first_segment():
    assert topic_namespace("alerts.k8s") == "alerts"
    assert topic_namespace("user:42") == "user"
    assert topic_namespace("reverse_flow:cluster-a") == "reverse_flow"
    assert topic_namespace("ops.deploys:eu") == "ops"
    assert topic_namespace("plain") == "plain"


def test_quantile_of_recorded_latencies_falls_in_the_bucket_of_the_exact_one():
    registry = CollectorRegistry()
    name = "notify_test_probe_seconds"
    probe = Histogram(name, "a probe", buckets=LATENCY_BUCKETS, registry=registry)

    def taken(at: float) -> dict:
        return snap(
            "h", at, [(s.name, s.labels, s.value) for f in registry.collect() for s in f.samples]
        )

    step = settings.METRICS_SNAPSHOT_S
    before = taken(1000 * step)  # the files may hold an earlier run's: compare increases
    observed = latencies()
    for value in observed:
        probe.observe(value)
    after = taken(1001 * step)
    a, b = figures.merge({"h": [before, after]})

    for q in (0.5, 0.9, 0.95, 0.99):
        exact = exact_quantile(observed, q)
        lower, upper = bucket_bounds(exact)
        estimate = figures.quantile(a, b, name, q)
        assert lower <= estimate <= upper, (q, exact, estimate)
    assert figures.quantile(b, b, name, 0.5) is None  # nothing observed between them


def test_merge_sums_the_hosts_of_one_interval():
    step = settings.METRICS_SNAPSHOT_S
    at = 5000 * step
    a = snap(
        "host-a",
        at,
        [
            ("notify_connections_active", {"transport": "websocket"}, 3),
            ("notify_notifications_ingested_total", {"source": "api"}, 10),
        ],
    )
    b = snap(
        "host-b",
        at + 0.3,  # published a moment later: the same interval
        [
            ("notify_connections_active", {"transport": "websocket"}, 2),
            ("notify_connections_active", {"transport": "sse"}, 1),
            ("notify_notifications_ingested_total", {"source": "api"}, 5),
        ],
    )
    [merged] = figures.merge({"host-a": [a], "host-b": [b]})
    assert merged.hosts == 2
    assert merged.by("notify_connections_active", "transport") == {"websocket": 5, "sse": 1}
    assert merged.total("notify_notifications_ingested_total", source="api") == 15

    later = snap(
        "host-a", at + step, [("notify_notifications_ingested_total", {"source": "api"}, 16)]
    )
    first, second = figures.merge({"host-a": [a, later], "host-b": [b]})
    # host-b did not publish in the second interval: its last snapshot still counts
    assert second.hosts == 2 and second.total("notify_notifications_ingested_total") == 21
    assert figures.rate(first, second, "notify_notifications_ingested_total") == 6 / step


def test_fanout_figures_summed_locally_write_what_direct_observations_write():
    registry = CollectorRegistry()
    direct = Histogram(
        "notify_test_direct_seconds", "d", buckets=LATENCY_BUCKETS, registry=registry
    )
    summed = Histogram(
        "notify_test_summed_seconds", "s", buckets=LATENCY_BUCKETS, registry=registry
    )

    def increases(before: Samples, after: Samples, name: str) -> dict:
        return {
            (sample.removeprefix(name), labels.get("le")): value - total(before, sample, **labels)
            for sample, labels, value in after
            if sample.startswith(name) and not sample.endswith("_created")
        }

    def read() -> Samples:
        return [(s.name, s.labels, s.value) for f in registry.collect() for s in f.samples]

    before = read()
    local = edge_metrics.LocalHistogram(summed)
    for value in [*latencies(500), 0.1, 0.0005, 60.0, 61.0]:  # bounds themselves, and above all
        direct.observe(value)
        local.observe(value)
    local.flush()
    local.flush()  # nothing pending: writes nothing
    after = read()
    got = increases(before, after, "notify_test_summed_seconds")
    want = increases(before, after, "notify_test_direct_seconds")
    assert got.keys() == want.keys()
    for k, value in want.items():
        assert got[k] == pytest.approx(value), k


# --- /metrics' protection ------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_refuse_anonymous_with_a_bearer_challenge(client):
    answer = client.get("/metrics")
    assert answer.status_code == 401
    assert answer["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
def test_metrics_refuse_a_non_staff_session(client, subscriber):
    client.force_login(subscriber)
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_metrics_accept_a_staff_session(client, operator):
    client.force_login(operator)
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer["Content-Type"].startswith("text/plain")
    names = {fam.name for fam in text_string_to_metric_families(answer.content.decode())}
    assert {"notify_build_info", "notify_deliveries"} <= names


@pytest.mark.django_db
def test_metrics_accept_the_bearer_token_and_refuse_a_wrong_one(client, settings):
    settings.METRICS_TOKEN = TOKEN
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer not-the-token")
    assert wrong.status_code == 401 and "WWW-Authenticate" in wrong


@pytest.mark.django_db
def test_metrics_without_a_configured_token_refuse_every_bearer(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401


# --- the switch ----------------------------------------------------------------------------------

SWITCHED_OFF = """
import json, os
from routing_app.metrics import instruments
from channels_app import edge_metrics
names = ["INGEST_DURATION", "FANOUT_DURATION"]
off = [getattr(instruments, n) is instruments.OFF for n in names]
off += [instruments.connections_active["websocket"] is instruments.OFF]
off += [instruments.delivery_attempts("c", "p", "sent") is instruments.OFF]
instruments.ingested["api"].inc()
instruments.connections_closed("websocket", "client").inc()
files = os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
files = [f for f in files if f.endswith(".db")]
print(json.dumps({"off": off, "edge": edge_metrics.ENABLED, "files": files}))
"""


def test_metrics_switched_off_record_nothing(tmp_path):
    env = {
        "METRICS_ENABLED": "false",
        "METRICS_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "notify_project.settings",
    }
    out = json.loads(run_script(env, SWITCHED_OFF).strip().splitlines()[-1])
    assert out == {"off": [True, True, True, True], "edge": False, "files": []}


# --- what the realtime edge records (in-process, WebsocketCommunicator) ---------------------------


@pytest.fixture
async def edge(_db_pool_closed_at_end):
    """The fresh-install topic rules, a clean principal cache; the hub and presence closed after."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("channels_app.migrations.0002_default_topic_rules")
    await sync_to_async(migration.create_defaults)(apps, None)
    socket_auth.forget_principals()
    yield
    await hub.aclose()
    await get_presence().close()
    socket_auth.forget_principals()


async def plain(path: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(websocket_application, path)
    connected, _ = await comm.connect(timeout=WAIT_S)
    assert connected
    return comm


async def until_type(comm: WebsocketCommunicator, kind: str) -> dict:
    while True:
        message = await comm.receive_json_from(timeout=WAIT_S)
        if message["type"] == kind:
            return message


async def close_code(comm: WebsocketCommunicator) -> int:
    while True:
        output = await comm.receive_output(timeout=WAIT_S)
        if output["type"] == "websocket.close":
            return output.get("code", 1000)


def changes(before: Samples, after: Samples, *keys: tuple) -> dict:
    """``{key: after - before}`` for each ``(name, {labels})`` in ``keys``."""
    return {
        (name, tuple(sorted(labels.items()))): total(after, name, **labels)
        - total(before, name, **labels)
        for name, labels in keys
    }


def key(name: str, **labels: str) -> tuple:
    return (name, tuple(sorted(labels.items())))


@pytest.mark.django_db(transaction=True)
async def test_plain_sockets_count_connections_subscriptions_and_one_fanout_per_batch(
    subscriber, edge
):
    topic = "alerts.metrics-edge"
    token = tokens.mint(subscriber.pk).token
    before = local_samples()
    socks = [await plain(f"/ws/{topic}/?token={token}") for _ in range(3)]
    for comm in socks:
        await until_type(comm, "subscribed")
    live = local_samples()

    items = [NotificationIn(topic=topic, event="tick", data={"i": i}) for i in range(2)]
    await sync_to_async(ingest)(items)  # one batch: published together
    for comm in socks:
        await until_type(comm, "notification")
        await until_type(comm, "notification")
    sent = local_samples()

    ws = {"transport": "websocket"}
    assert changes(
        before,
        live,
        ("notify_connections_accepted_total", ws),
        ("notify_connections_active", ws),
        ("notify_subscriptions_active", {**ws, "topic_namespace": "alerts"}),
    ) == {
        key("notify_connections_accepted_total", **ws): 3,
        key("notify_connections_active", **ws): 3,
        key("notify_subscriptions_active", **ws, topic_namespace="alerts"): 3,
    }
    # subscribers x messages, counted per batch; the latency once per message, not per socket
    assert (
        total(sent, "notify_messages_sent_total", **ws)
        - total(live, "notify_messages_sent_total", **ws)
        == 6
    )
    latency = "notify_delivery_duration_seconds_count"
    assert (
        total(sent, latency, channel="websocket") - total(live, latency, channel="websocket") == 2
    )
    fanouts = total(sent, "notify_fanout_duration_seconds_count") - total(
        live, "notify_fanout_duration_seconds_count"
    )
    assert 1 <= fanouts <= 2  # one batch, or two if the messages arrived apart

    for comm in socks:
        await comm.disconnect()
    gone = local_samples()
    assert total(gone, "notify_connections_active", **ws) == total(
        before, "notify_connections_active", **ws
    )
    assert total(gone, "notify_subscriptions_active", **ws, topic_namespace="alerts") == total(
        before, "notify_subscriptions_active", **ws, topic_namespace="alerts"
    )
    closed = "notify_connections_closed_total"
    assert (
        total(gone, closed, **ws, reason="client") - total(before, closed, **ws, reason="client")
        == 3
    )


@pytest.mark.django_db(transaction=True)
async def test_a_socket_closed_by_the_server_then_by_the_client_counts_one_close(subscriber, edge):
    token = tokens.mint(subscriber.pk).token
    ws = {"transport": "websocket"}
    closed = "notify_connections_closed_total"
    before = local_samples()

    big = await plain(f"/ws/alerts.metrics-close/?token={token}")
    await until_type(big, "subscribed")
    await big.send_to(text_data="x" * (settings.MAX_MESSAGE_BYTES + 1))
    assert await close_code(big) == 1009
    await big.disconnect()  # the client's close after the server's: still one close

    refused = await plain("/ws/alerts.metrics-close/")  # anonymous: refused after accept
    assert await close_code(refused) == 4401
    await refused.disconnect()

    after = local_samples()
    for reason, count in (("too_big", 1), ("unauthenticated", 1), ("client", 0)):
        change = total(after, closed, **ws, reason=reason) - total(
            before, closed, **ws, reason=reason
        )
        assert change == count, reason
    assert total(after, "notify_connections_active", **ws) == total(
        before, "notify_connections_active", **ws
    )


@pytest.mark.django_db(transaction=True)
async def test_a_phoenix_socket_counts_each_joined_topic_and_its_presence(operator, edge):
    from tests.test_phoenix_protocol import Client, application, join

    path = "/socket/websocket?vsn=2.0.0&token=" + tokens.mint(operator.pk).token
    communicator = WebsocketCommunicator(application(), path)
    assert (await communicator.connect(timeout=WAIT_S))[0]
    client = Client(communicator)
    ph = {"transport": "phoenix"}
    before = local_samples()

    for topic in ("alerts.metrics-a", "alerts.metrics-b", "reverse_flow:metrics"):
        assert (await join(client, topic))[4]["status"] == "ok"
        await client.until("presence_state", topic)
    joined = local_samples()
    await client.push("alerts.metrics-b", "phx_leave", join_ref="2")
    await client.until("phx_close", "alerts.metrics-b")
    left = local_samples()
    await communicator.disconnect()
    gone = local_samples()

    def subs(samples: Samples, namespace: str) -> float:
        return total(samples, "notify_subscriptions_active", **ph, topic_namespace=namespace)

    def present(samples: Samples, namespace: str) -> float:
        return total(samples, "notify_presence_users", topic_namespace=namespace)

    assert subs(joined, "alerts") - subs(before, "alerts") == 2
    assert subs(joined, "reverse_flow") - subs(before, "reverse_flow") == 1
    assert present(joined, "alerts") - present(before, "alerts") == 2
    assert subs(left, "alerts") - subs(before, "alerts") == 1
    assert present(left, "alerts") - present(before, "alerts") == 1
    for namespace in ("alerts", "reverse_flow"):
        assert subs(gone, namespace) == subs(before, namespace)
        assert present(gone, namespace) == present(before, namespace)
    closed = "notify_connections_closed_total"
    assert (
        total(gone, closed, **ph, reason="client") - total(before, closed, **ph, reason="client")
        == 1
    )


# --- histogram_quantile over the exported buckets -------------------------------------------------


@pytest.mark.django_db
def test_histogram_quantile_over_the_exported_buckets_is_within_the_exact_ones_bucket(
    client, operator
):
    client.force_login(operator)
    probe = instruments.delivery_duration("quantile-probe")  # a channel no other test uses
    before = parse(client.get("/metrics").content.decode())
    observed = latencies()
    for value in observed:
        probe.observe(value)
    after = parse(client.get("/metrics").content.decode())

    name = "notify_delivery_duration_seconds_bucket"
    buckets = {
        float(labels["le"]): value - total(before, name, channel="quantile-probe", le=labels["le"])
        for sample, labels, value in after
        if sample == name and labels.get("channel") == "quantile-probe"
    }
    assert buckets[math.inf] == len(observed)
    for q in (0.5, 0.95, 0.99):
        lower, upper = bucket_bounds(exact_quantile(observed, q))
        assert lower <= histogram_quantile(q, buckets) <= upper, q


# --- snapshots ------------------------------------------------------------------------------------


@pytest.fixture
def snapshot_prefix(settings):
    """Snapshots under a Redis prefix of this test's own, removed afterwards."""
    if not settings.REDIS_URL:
        pytest.skip("snapshots go to Redis only with REDIS_URL (embedded: kept in the process)")
    from routing_app.pubsub import sync_redis

    settings.REDIS_PREFIX = f"{settings.REDIS_PREFIX}-snapshot-test"
    client = sync_redis()

    def clean() -> None:
        keys = list(client.scan_iter(f"{settings.REDIS_PREFIX}:metrics:*"))
        if keys:
            client.delete(*keys)

    clean()
    yield client
    clean()


@pytest.mark.django_db
def test_publish_once_writes_one_latest_and_one_history_entry_per_host(settings, snapshot_prefix):
    client = snapshot_prefix
    for host in ("host-a", "host-b"):
        settings.METRICS_HOST = host
        assert snapshot.publish_once()

    history = snapshot.history()
    assert sorted(history) == ["host-a", "host-b"]
    for host, snaps in history.items():
        assert len(snaps) == 1 and snaps[0]["host"] == host
        names = {name for name, _labels, _value in snaps[0]["samples"]}
        assert "notify_build_info" in names
        latest = json.loads(client.get(f"{settings.REDIS_PREFIX}:metrics:latest:{host}"))
        assert latest == snaps[0]
        assert client.llen(f"{settings.REDIS_PREFIX}:metrics:history:{host}") == 1
    merged = figures.merge(history)[-1]  # two slots if the publishes straddled a boundary
    assert merged.hosts == 2
    assert merged.total("notify_build_info") == 2


# --- a real scrape across processes ---------------------------------------------------------------

CONFIGURE_WEBHOOK = """
import sys
from routing_app.models import Channel, Provider, Route
channel = Channel.objects.create(name="hook", kind="webhook", breaker_call_timeout_ms=5000)
Provider.objects.create(channel=channel, name="hook-1", url=sys.argv[1])
route = Route.objects.create(name="hook", topic_pattern="ops.#")
route.channels.set([channel])
"""


def scrape(server: NotifyServer, token: str = TOKEN) -> Samples:
    answer = httpx.get(
        f"{server.base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT_S
    )
    assert answer.status_code == 200, answer.text
    return parse(answer.text)


def scrape_until(server: NotifyServer, what: str, done) -> Samples:
    """Scrape until ``done(samples)`` (counters of other processes have no event to wait on)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = scrape(server)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Two uvicorn processes (one metrics directory: same environment) and a Celery worker, a
    webhook receiver for the route ``ops.#``."""
    if not settings.REDIS_URL:
        pytest.skip("several processes share state (and a Celery broker) only with REDIS_URL")
    directory = tmp_path_factory.mktemp("metrics")
    with (
        HTTPReceiver() as hooks,
        server_environment(directory, "metrics", METRICS_TOKEN=TOKEN) as env,
    ):
        seeded = seed(env)
        run_script(env, CONFIGURE_WEBHOOK, hooks.url + "/hook")
        servers = [NotifyServer(env, directory / f"server-{n}.log") for n in ("a", "b")]
        with spawned([*servers, CeleryWorker(env, directory / "worker.log")]) as (*_, worker):
            yield {
                "servers": servers,
                "worker": worker,
                "hooks": hooks,
                "key": seeded["api_key"],
                "token": seeded["tokens"]["sam"],
                "env": env,
            }


class Reader:
    """A realtime client: live once ``subscribed``, counts notifications, ends on close."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.live = asyncio.Event()
        self.seqs: list[int] = []
        self.got = asyncio.Condition()
        self.task: asyncio.Task | None = None

    def start(self) -> Reader:
        self.task = asyncio.create_task(self.run())
        return self

    async def run(self) -> None:
        raise NotImplementedError

    async def on(self, data: dict) -> None:
        if data["type"] == "subscribed":
            self.live.set()
        elif data["type"] == "notification":
            async with self.got:
                self.seqs.append(data["seq"])
                self.got.notify_all()

    async def wait_for(self, count: int) -> None:
        async with self.got:
            await asyncio.wait_for(self.got.wait_for(lambda: len(self.seqs) >= count), WAIT_S)


class Socket(Reader):
    """The plain WebSocket protocol."""

    async def run(self) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            async with ws_connect(self.url, open_timeout=WAIT_S) as ws:
                async for raw in ws:
                    await self.on(json.loads(raw))


class Stream(Reader):
    """An SSE stream (``data`` is one line of JSON)."""

    async def run(self) -> None:
        timeout = httpx.Timeout(WAIT_S, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", self.url, headers={"Accept": "text/event-stream"}) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    await self.on(json.loads(line[5:]))


@pytest.mark.timeout(240)
async def test_one_scrape_sums_every_process_and_a_killed_ones_gauges_leave_it(deployment):
    a, b = deployment["servers"]
    n, m = 3, 2
    topic = "alerts.metrics-xproc"

    def url(server: NotifyServer) -> str:
        return f"ws://127.0.0.1:{server.port}/ws/{topic}/?token={deployment['token']}"

    sockets = [Socket(url(a)).start() for _ in range(n)] + [
        Socket(url(b)).start() for _ in range(m)
    ]
    stream = Stream(f"{a.base}/events/{topic}/?token={deployment['token']}").start()
    readers = [*sockets, stream]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.live.wait() for r in readers)), WAIT_S)
        posts = [(a, topic), (b, topic), (a, topic), (a, "ops.deploys")]
        for server, to in posts:
            await sync_to_async(server.post)(deployment["key"], to, "metrics.tick", {"to": to})
        for reader in readers:
            await reader.wait_for(3)
        await sync_to_async(deployment["hooks"].wait_for)(1)

        ws = {"transport": "websocket"}
        sent = {"channel": "hook", "provider": "hook-1", "outcome": "sent"}
        websocket_latency = {"channel": "websocket"}

        def complete(s: Samples) -> bool:
            # the worker's attempt, and the fanout figures (flushed once a second)
            return (
                total(s, "notify_delivery_attempts_total", **sent) >= 1
                and total(s, "notify_messages_sent_total", **ws) >= 3 * (n + m)
                and total(s, "notify_delivery_duration_seconds_count", **websocket_latency) >= 6
                and total(s, "notify_messages_sent_total", transport="sse") >= 3
                and total(s, "notify_presence_users", topic_namespace="alerts") >= n + m + 1
            )

        samples = await sync_to_async(scrape_until)(a, "every process's figures", complete)
        assert total(samples, "notify_connections_active", **ws) == n + m
        assert total(samples, "notify_connections_accepted_total", **ws) == n + m
        subs = {**ws, "topic_namespace": "alerts"}
        assert total(samples, "notify_subscriptions_active", **subs) == n + m
        assert total(samples, "notify_delivery_attempts_total", **sent) == 1
        assert total(samples, "notify_delivery_duration_seconds_count", channel="hook") == 1
        assert total(samples, "notify_notifications_ingested_total") == len(posts)
        assert total(samples, "notify_messages_sent_total", **ws) == 3 * (n + m)
        # the latency once per message per transport in each process that has subscribers
        assert total(samples, "notify_delivery_duration_seconds_count", **websocket_latency) == 6
        sse = {"transport": "sse"}
        assert total(samples, "notify_connections_active", **sse) == 1
        assert total(samples, "notify_subscriptions_active", **sse, topic_namespace="alerts") == 1
        assert total(samples, "notify_messages_sent_total", **sse) == 3
        assert total(samples, "notify_delivery_duration_seconds_count", channel="sse") == 3
        # sam, logged in by token, is present once per socket and stream
        assert total(samples, "notify_presence_users", topic_namespace="alerts") == n + m + 1
        reasons = {
            lb["reason"] for name, lb, _ in samples if name.startswith("notify_connections_c")
        }
        assert reasons <= edge_metrics.CLOSE_REASONS
        roles = {
            labels["role"] for name, labels, _ in samples if name.startswith("notify_process_")
        }
        assert {"web", "worker"} <= roles

        wrong = httpx.get(f"{a.base}/metrics", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401

        # SIGKILL: no close, no decrement; its live gauges must leave the sum by themselves
        await sync_to_async(b.kill)()
        await asyncio.wait_for(asyncio.gather(*(s.task for s in sockets[n:])), WAIT_S)
        samples = await sync_to_async(scrape)(a)
        assert total(samples, "notify_connections_active", **ws) == n
        assert total(samples, "notify_connections_active", **sse) == 1  # A's stream is still open
        assert total(samples, "notify_presence_users", topic_namespace="alerts") == n + 1
        assert total(samples, "notify_subscriptions_active", **subs) == n
        assert total(samples, "notify_connections_accepted_total", **ws) == n + m  # counters stay
        assert total(samples, "notify_notifications_ingested_total") == len(posts)
    finally:
        for reader in readers:
            reader.task.cancel()
        await asyncio.gather(*(r.task for r in readers), return_exceptions=True)
