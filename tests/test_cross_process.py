"""Cross-process fanout (issue 3, point 3): two uvicorn server processes sharing Redis and the
database behave as one edge.

- a notification posted to one server reaches plain WebSocket and SSE clients on both;
- presence is the union of both servers (Phoenix joins tracked on each, read back through
  ``GET /api/v1/topics/<topic>/presence`` and the plain socket's ``presence`` frame on each);
- Redis restarted while notifications are being posted: every client (plain socket and SSE, on
  both servers) ends with every seq exactly once, in order. Clients that get disconnected
  reconnect with ``since`` / ``Last-Event-ID`` = the last seq they saw, as the JS client does.

The servers get a database of their own (a fresh Postgres database next to DATABASE_URL's, else a
SQLite file) and a redis-server this module starts on a free port, never the shared one, so
restarting it disturbs nobody else. In the embedded mode (no REDIS_URL) the test is skipped:
there, each process has its own in-memory hub and presence, so two processes share nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60  # a cold Django + uvicorn start on a busy 2-core machine
EVENT_TIMEOUT_S = 20  # upper bound for one awaited event; passing runs take far less
ORIGIN = "http://xproc.test"
RECONNECT_DELAY_S = 0.1  # a client's pause before reconnecting (as a real client backs off)

pytestmark = pytest.mark.skipif(
    not settings.REDIS_URL,
    reason="cross-process fanout needs REDIS_URL: in the embedded mode every process has its own "
    "in-memory hub and presence, so two server processes share no state to test",
)

SETUP_SCRIPT = """
import json, os
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0, interactive=False)
from django.contrib.auth import get_user_model
from channels_app.tokens import mint
from routing_app.models import ApiKey
User = get_user_model()
sam = User.objects.create_user("sam", "sam@example.com", "pw-sam")
olga = User.objects.create_user("olga", "olga@example.com", "pw-olga")
key = ApiKey(name="cross-process-test", scopes=["ingest", "tokens"])
raw = key.set_new_key()
key.save()
print("SETUP " + json.dumps({
    "api_key": raw,
    "tokens": {"sam": mint(sam.pk, 3600).token, "olga": mint(olga.pk, 3600).token},
}))
"""


# --- processes: our own redis-server, two uvicorn servers -----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # polling a port: there is no event to wait on for "listening"
    raise AssertionError(f"nothing listened on {port} within {STARTUP_TIMEOUT_S} s")


class OwnRedis:
    """A redis-server of this test module (no persistence: a restart loses everything, as a
    crashed cache would), restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _wait_listening(self.port, self.proc, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path_factory.mktemp("xproc-redis"))
    redis.start()
    yield redis
    redis.kill()


def _fresh_postgres_database(url: str, suffix: str):
    """Create an empty database next to the one in ``url``; return its URL and a drop function."""
    import psycopg

    parsed = urlparse(url)
    name = (parsed.path.lstrip("/") or "notify") + suffix
    admin = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunparse(parsed._replace(path="/" + name)), drop


@pytest.fixture(scope="module")
def deployment(own_redis, tmp_path_factory) -> Iterator[dict]:
    """Two uvicorn processes on one database and our Redis. Yields {"urls": [a, b], "api_key",
    "tokens": {"sam", "olga"}}."""
    workdir = tmp_path_factory.mktemp("xproc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        REDIS_URL=own_redis.url,
        REDIS_PREFIX=os.environ.get("REDIS_PREFIX", "notify") + "-xproc",
        NOTIFY_ALLOWED_ORIGINS=ORIGIN,
        LOG_LEVEL="WARNING",
    )
    drop = None
    if settings.USING_POSTGRES:
        env["DATABASE_URL"], drop = _fresh_postgres_database(os.environ["DATABASE_URL"], "_xproc")
    else:
        env.pop("DATABASE_URL", None)
        env["SQLITE_PATH"] = str(workdir / "db.sqlite3")
    done = subprocess.run(
        [sys.executable, "-c", SETUP_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    setup = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("SETUP "))[6:])
    procs: list[tuple[subprocess.Popen, int, Path]] = []
    try:
        for name in ("a", "b"):
            port = _free_port()
            log = workdir / f"server-{name}.log"
            argv = [sys.executable, "-m", "uvicorn", "notify_project.asgi:application"]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"]
            argv += ["--no-access-log", "--log-level", "warning"]
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            procs.append((proc, port, log))
        for proc, port, log in procs:  # both start at once: a cold start takes seconds
            _wait_listening(port, proc, log)
        yield {
            "urls": [f"http://127.0.0.1:{port}" for _, port, _ in procs],
            "api_key": setup["api_key"],
            "tokens": setup["tokens"],
            "logs": [log for _, _, log in procs],
        }
    finally:
        for proc, _, _ in procs:
            proc.terminate()
        for proc, _, _ in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if drop:
            drop()


# --- clients ------------------------------------------------------------------------------------


class Received:
    """What one client saw: the seqs of notifications in arrival order, across reconnects."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seqs: list[int] = []
        self.live = asyncio.Event()  # "subscribed" seen: from here on the client is live
        self.reconnects = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []

    @property
    def last(self) -> int | None:
        return self.seqs[-1] if self.seqs else None

    def add(self, seq: int) -> None:
        self.seqs.append(seq)
        for target, event in self._waiters:
            if seq >= target:
                event.set()

    async def wait_for(self, seq: int) -> None:
        if self.seqs and max(self.seqs) >= seq:
            return
        event = asyncio.Event()
        self._waiters.append((seq, event))
        try:
            await asyncio.wait_for(event.wait(), EVENT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} never got seq {seq}; it has {self.seqs[-10:]} "
                f"after {self.reconnects} reconnect(s)"
            ) from None


async def plain_client(base: str, topic: str, token: str, got: Received, since: int | None):
    """A plain-protocol client that reconnects with ``since`` = the last seq it saw."""
    ws_base = base.replace("http://", "ws://")
    while True:
        resume = got.last if got.last is not None else since
        url = f"{ws_base}/ws/{topic}/?token={token}"
        if resume is not None:
            url += f"&since={resume}"
        try:
            async with ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S) as ws:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "notification":
                        got.add(frame["seq"])
                    elif frame["type"] == "subscribed":
                        got.live.set()
                    elif frame["type"] == "ping":
                        await ws.send('{"type":"pong"}')
        except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
            pass
        got.reconnects += 1
        await asyncio.sleep(RECONNECT_DELAY_S)  # a client's backoff, not a wait for an event


async def sse_client(base: str, topic: str, token: str, got: Received, since: int | None):
    """An SSE client that reconnects with ``Last-Event-ID`` = the last seq it saw."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        while True:
            resume = got.last if got.last is not None else since
            headers = {"Accept": "text/event-stream", "Origin": ORIGIN}
            if resume is not None:
                headers["Last-Event-ID"] = str(resume)
            try:
                url = f"{base}/events/{topic}/?token={token}"
                async with http.stream("GET", url, headers=headers) as response:
                    if response.status_code == 200:
                        data: list[str] = []
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                data.append(line[5:].strip())
                            elif line == "" and data:
                                payload = json.loads("\n".join(data))
                                data = []
                                if payload["type"] == "notification":
                                    got.add(payload["seq"])
                                elif payload["type"] == "subscribed":
                                    got.live.set()
            except (httpx.HTTPError, OSError):
                pass
            got.reconnects += 1
            await asyncio.sleep(RECONNECT_DELAY_S)  # a client's backoff


class Poster:
    """Posts notifications through the ingest API of one of the servers."""

    def __init__(self, http: httpx.AsyncClient, api_key: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {api_key}"}

    async def post(self, base: str, topic: str, i: int) -> httpx.Response:
        body = {"topic": topic, "event": "xproc.tick", "data": {"i": i}}
        body["idempotency_key"] = f"{topic}-{i}"  # a retried post after an outage is safe
        return await self.http.post(f"{base}/api/v1/notifications", json=body, headers=self.headers)

    async def post_until_accepted(self, base: str, topic: str, i: int) -> tuple[int, int]:
        """Retry while Redis is down (the limiter answers 503); returns (seq, refusals)."""
        refused = 0
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while True:
            try:
                response = await self.post(base, topic, i)
                if response.status_code == 202:
                    return response.json()["seq"], refused
                assert response.status_code in (503, 429), response.text
            except httpx.TransportError:
                pass
            refused += 1
            assert time.monotonic() < deadline, f"post {i} still refused after {refused} tries"
            await asyncio.sleep(RECONNECT_DELAY_S)  # a publisher's backoff


@contextlib.asynccontextmanager
async def running(*coros):
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_live(*received: Received) -> None:
    for got in received:
        try:
            await asyncio.wait_for(got.live.wait(), EVENT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"{got.name} never subscribed") from None


# --- tests --------------------------------------------------------------------------------------


async def test_notification_posted_to_one_server_reaches_sockets_and_sse_on_both(deployment):
    a, b = deployment["urls"]
    token = deployment["tokens"]["sam"]
    topic = "xproc.reach"
    clients = {
        f"{kind} on {name}": Received(f"{kind} on {name}")
        for kind in ("socket", "sse")
        for name in ("a", "b")
    }
    bases = {"a": a, "b": b}
    coros = []
    for label, got in clients.items():
        kind, _, name = label.split(" ")
        client = plain_client if kind == "socket" else sse_client
        coros.append(client(bases[name], topic, token, got, None))
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*clients.values())
        poster = Poster(http, deployment["api_key"])
        first = await poster.post(a, topic, 1)
        assert first.status_code == 202, first.text
        second = await poster.post(b, topic, 2)
        assert second.status_code == 202, second.text
        seqs = [first.json()["seq"], second.json()["seq"]]
        for got in clients.values():
            await got.wait_for(seqs[1])
    for got in clients.values():
        assert got.seqs == seqs, got.name


async def _phoenix_join(base: str, topic: str, token: str):
    url = base.replace("http://", "ws://") + f"/socket/websocket?vsn=2.0.0&token={token}"
    ws = await ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S)
    await ws.send(json.dumps(["1", "1", topic, "phx_join", {}]))
    while True:
        join_ref, ref, frame_topic, event, payload = json.loads(
            await asyncio.wait_for(ws.recv(), EVENT_TIMEOUT_S)
        )
        if event == "phx_reply" and ref == "1":
            assert payload["status"] == "ok", payload
        if event == "presence_state":
            return ws, payload


def _usernames(state: dict) -> list[str]:
    return sorted({meta["username"] for entry in state.values() for meta in entry["metas"]})


async def _presence_join_of(ws, username: str) -> dict:
    """The next ``presence_diff`` on this Phoenix socket whose joins include ``username``."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), EVENT_TIMEOUT_S))
        if frame[3] == "presence_diff" and username in _usernames(frame[4]["joins"]):
            return frame[4]


async def test_presence_is_the_union_of_both_servers(deployment):
    a, b = deployment["urls"]
    tokens = deployment["tokens"]
    topic = "xproc.presence"
    sam_ws, _ = await _phoenix_join(a, topic, tokens["sam"])
    try:
        olga_ws, olga_state = await _phoenix_join(b, topic, tokens["olga"])
        try:
            # olga's first state, from server b, holds sam, tracked on server a; sam hears olga
            # join through the other process.
            assert _usernames(olga_state) == ["olga", "sam"]
            await _presence_join_of(sam_ws, "olga")
            headers = {"Authorization": f"Bearer {deployment['api_key']}"}
            async with httpx.AsyncClient() as http:
                for base in (a, b):
                    r = await http.get(f"{base}/api/v1/topics/{topic}/presence", headers=headers)
                    assert r.status_code == 200, r.text
                    assert sorted(u["username"] for u in r.json()["users"]) == ["olga", "sam"]
            for base in (a, b):
                url = base.replace("http://", "ws://") + f"/ws/{topic}/?token={tokens['sam']}"
                async with ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S) as plain:
                    await plain.send('{"type":"presence"}')
                    while True:
                        frame = json.loads(await asyncio.wait_for(plain.recv(), EVENT_TIMEOUT_S))
                        if frame["type"] == "presence":
                            break
                    assert sorted(u["username"] for u in frame["users"]) == ["olga", "sam"]
        finally:
            await olga_ws.close()
    finally:
        await sam_ws.close()


async def test_redis_restart_mid_stream_every_client_gets_every_seq_exactly_once(
    deployment, own_redis
):
    a, b = deployment["urls"]
    token = deployment["tokens"]["sam"]
    topic = "xproc.restart"
    total, restart_after = 40, 15
    clients = [Received(f"{kind} on {name}") for kind in ("socket", "sse") for name in ("a", "b")]
    bases = {"a": a, "b": b}
    coros = []
    for got in clients:
        kind, _, name = got.name.split(" ")
        client = plain_client if kind == "socket" else sse_client
        # since=0: the stream from its start, so nothing depends on when a client got live.
        coros.append(client(bases[name], topic, token, got, 0))
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*clients)
        poster = Poster(http, deployment["api_key"])
        seqs = []
        for i in range(total):
            base = bases["ab"[i % 2]]
            if i == restart_after:
                # Mid-stream: this post meets Redis down (refused, or stored and then retried
                # under its idempotency key), then Redis comes back empty; the servers must
                # reconnect, resubscribe and back-fill by themselves.
                await asyncio.to_thread(own_redis.kill)
                with contextlib.suppress(httpx.TransportError):
                    await poster.post(base, topic, i)
                await asyncio.to_thread(own_redis.start)
            seq, _ = await poster.post_until_accepted(base, topic, i)
            seqs.append(seq)
        assert seqs == list(range(1, total + 1))
        for got in clients:
            await got.wait_for(total)
    for got in clients:
        assert got.seqs == seqs, f"{got.name} after {got.reconnects} reconnect(s)"
