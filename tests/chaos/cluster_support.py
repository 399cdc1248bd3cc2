"""Several server processes as one edge under faults: their clients, the tally of what each client
saw, and a server process inside a network namespace of its own (for partitions).

The plain WebSocket and SSE clients, the ingest poster and the ``Received`` record are
tests/test_cross_process.py's; this module adds the Phoenix client (rejoining with ``since``, as
the JS client does), the figures the chaos suite records (``tally``) and ``Namespace`` /
``NamespacedServer``: a uvicorn of ``manage.py serve`` started with ``ip netns exec`` behind two
veth pairs, one to its clients and one to Redis, so the Redis link alone can be cut.

Addresses: the veth pairs use 10.231.<n>.0/30. They are machine-local links between two network
namespaces of this host (a namespace's loopback is not reachable from the host), never routed
anywhere else. Postgres is reached through its Unix socket, which a network namespace does not
hide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from routing_app.management.commands.serve import uvicorn_argv
from tests.servers import STARTUP_TIMEOUT_S, NotifyServer, log_tail
from tests.test_cross_process import (
    EVENT_TIMEOUT_S,
    ORIGIN,
    RECONNECT_DELAY_S,
    Received,
    plain_client,
    server_for,
    sse_client,
)

PHOENIX_HEARTBEAT_S = 20  # below the server's HEARTBEAT_TIMEOUT_S, as the phoenix client's 30 s
POSTGRES_SOCKET_DIR = "/var/run/postgresql"


# --- the Phoenix client -------------------------------------------------------------------------


async def phoenix_client(
    base: str | Sequence[str], topic: str, token: str, got: Received, since: int | None
) -> None:
    """A Phoenix V2 client joined to ``topic`` that reconnects and rejoins with ``{"since": N}``
    = the last seq it saw (after a close, a ``phx_error`` or a failed connect)."""
    while True:
        resume = got.last if got.last is not None else since
        ws_base = server_for(base, got).replace("http://", "ws://")
        url = f"{ws_base}/socket/websocket?vsn=2.0.0&token={token}"
        try:
            async with ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S) as ws:
                join = {} if resume is None else {"since": resume}
                await ws.send(json.dumps(["1", "1", topic, "phx_join", join]))
                beat = asyncio.ensure_future(_heartbeat(ws))
                try:
                    async for raw in ws:
                        _join_ref, _ref, _topic, event, payload = json.loads(raw)
                        if event == "notification":
                            got.add(payload["seq"])
                        elif event == "presence_state":
                            got.live.set()  # sent once the join's replay is done
                        elif event in ("phx_error", "phx_close"):
                            break  # rejoin on a new connection
                        elif event == "phx_reply" and payload.get("status") != "ok":
                            if _topic == topic:
                                break
                finally:
                    beat.cancel()
        except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
            pass
        got.reconnects += 1
        await asyncio.sleep(RECONNECT_DELAY_S)  # a client's backoff, not a wait for an event


async def _heartbeat(ws) -> None:
    ref = 100
    while True:
        await asyncio.sleep(PHOENIX_HEARTBEAT_S)  # the protocol's beat, not a wait for an event
        ref += 1
        await ws.send(json.dumps([None, str(ref), "phoenix", "heartbeat", {}]))


# --- what every client saw ----------------------------------------------------------------------


def clients_on_both(
    a: NotifyServer, b: NotifyServer, topic: str, token: str, per_kind: int
) -> tuple[dict[str, list[Received]], list]:
    """``per_kind`` plain, Phoenix and SSE clients of ``topic`` homed on each of ``a`` and ``b``,
    reading the whole stream (since=0, so nothing depends on when a client got live); a reconnect
    goes to the other server (a load balancer's choice), then back. Returns the clients by home
    ("a", "b") and the coroutines that run them."""
    kinds = {"socket": plain_client, "phoenix": phoenix_client, "sse": sse_client}
    clients: dict[str, list[Received]] = {"a": [], "b": []}
    coros = []
    for home, server, other in (("a", a, b), ("b", b, a)):
        for kind, client in kinds.items():
            for n in range(per_kind):
                got = Received(f"{kind} {n} on {home}")
                clients[home].append(got)
                coros.append(client([server.base, other.base], topic, token, got, 0))
    return clients, coros


def tally(clients: Iterable[Received], published: Sequence[int]) -> dict[str, int]:
    """The chaos figures of ``clients`` against the seqs ``published``: received per client
    (min/max), and lost, duplicated and out-of-order seqs summed over the clients."""
    expected = set(published)
    counts, lost, duplicated, out_of_order = [], 0, 0, 0
    for got in clients:
        counts.append(len(got.seqs))
        lost += len(expected - set(got.seqs))
        duplicated += len(got.seqs) - len(set(got.seqs))
        out_of_order += sum(1 for a, b in zip(got.seqs, got.seqs[1:], strict=False) if b < a)
    return {
        "published": len(published),
        "received_per_client_min": min(counts),
        "received_per_client_max": max(counts),
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
    }


# --- a server process in a network namespace of its own -----------------------------------------


def netns_unusable() -> str | None:
    """Why network namespaces cannot be used here (None when they can): ``ip`` missing, or not
    allowed to create one (not root)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"notify-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed (root is needed): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


class Namespace:
    """A network namespace ``name`` with two veth pairs to the host: ``client`` (the server's
    clients reach ``address`` through it) and ``redis`` (the server reaches ``redis_host`` on
    the host through it, and nothing else). ``cut()`` downs the Redis link's host end: the
    server's packets to Redis vanish without a reset, as in a partition; ``heal()`` ups it."""

    def __init__(self, name: str, subnet: int) -> None:
        self.name = name
        self.address = f"10.231.{subnet}.2"  # the server, on the client link
        self.redis_host = f"10.231.{subnet + 1}.1"  # Redis, on the host end of the Redis link
        self._subnet = subnet
        short = name[-6:]
        self._links = {
            "client": (f"nc{short}", f"nc{short}p"),
            "redis": (f"nr{short}", f"nr{short}p"),
        }

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        for offset, (host_end, ns_end) in enumerate(self._links.values()):
            net = f"10.231.{self._subnet + offset}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", self.name)
            _ip("addr", "add", f"{net}.1/30", "dev", host_end)
            _ip("link", "set", host_end, "up")
            _ip("netns", "exec", self.name, "ip", "addr", "add", f"{net}.2/30", "dev", ns_end)
            _ip("netns", "exec", self.name, "ip", "link", "set", ns_end, "up")

    def cut(self) -> None:
        _ip("link", "set", self._links["redis"][0], "down")

    def heal(self) -> None:
        _ip("link", "set", self._links["redis"][0], "up")

    def delete(self) -> None:
        """Remove the namespace and its links (deleting one end of a veth pair deletes both);
        a no-op for what is already gone."""
        for host_end, _ in self._links.values():
            subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> Namespace:
        self.delete()  # what an interrupted run may have left
        try:
            self.create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.delete()


def postgres_socket_missing(url: str) -> str | None:
    """Why the Postgres of ``url`` cannot be reached by its Unix socket (None when it can)."""
    port = urlparse(url).port or 5432
    path = Path(POSTGRES_SOCKET_DIR) / f".s.PGSQL.{port}"
    return None if path.exists() else f"no Postgres Unix socket at {path}"


def unix_socket_database_url(url: str) -> str:
    """``url`` (a Postgres URL on 127.0.0.1) through the server's Unix socket instead, which a
    process in another network namespace still reaches."""
    parsed = urlparse(url)
    user = parsed.username or "postgres"
    query = f"host={POSTGRES_SOCKET_DIR}"
    return urlunparse(parsed._replace(netloc=f"{user}@", query=query))


class NamespacedServer(NotifyServer):
    """``NotifyServer`` run inside ``namespace`` with ``ip netns exec`` (which execs: the pid is
    uvicorn's), listening on the namespace's client address."""

    def __init__(self, env: dict[str, str], log: Path, namespace: Namespace) -> None:
        super().__init__(env, log)
        self.namespace = namespace
        self.base = f"http://{namespace.address}:{self.port}"
        self.socket_url = f"ws://{namespace.address}:{self.port}/socket"

    @property
    def argv(self) -> list[str]:
        serve = [*uvicorn_argv(self.namespace.address, self.port), f"--log-level={self.log_level}"]
        return ["ip", "netns", "exec", self.namespace.name, *serve]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"uvicorn in {self.namespace.name} exited:\n{log_tail(self.log)}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.namespace.address, self.port), 1),
            ):
                return
            assert time.monotonic() < deadline, f"uvicorn in {self.namespace.name} did not listen"
            time.sleep(0.05)  # polling a port: there is no event to wait on for "listening"
