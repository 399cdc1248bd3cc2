"""What the flood, request-limit and authorization suites share: one live server per module, raw
HTTP over a socket, and a normal client's latencies measured beside a flood.

Not a test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.servers import NotifyServer, seed, server_environment

# One line per request of the normal client and the floods would bury a failure's output.
logging.getLogger("httpx").setLevel(logging.WARNING)

ANSWER_WAIT_S = 45  # above every deadline of the front door (30 s for a body), on a busy machine


@dataclass
class Live:
    """A running server and the personas seeded into its database (tests/servers.py ``seed``)."""

    server: NotifyServer
    api_key: str
    ids: dict[str, int]
    tokens: dict[str, str]
    sam_session: str
    env: dict[str, str]

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base(self) -> str:
        return self.server.base


@contextlib.contextmanager
def live_server(directory: Path, name: str, **extra: str) -> Iterator[Live]:
    """A seeded database and one server on it (``manage.py serve``'s uvicorn command line)."""
    with server_environment(directory, name, **extra) as env:
        seeded = seed(env)
        server = NotifyServer(env, directory / "uvicorn.log")
        try:
            server.start()
            yield Live(
                server,
                seeded["api_key"],
                seeded["ids"],
                seeded["tokens"],
                seeded["sam_session"],
                env,
            )
        finally:
            server.stop()


@dataclass
class RawAnswer:
    """What came back on a raw connection: the status line's code (None: closed without one)."""

    status: int | None
    head: bytes
    elapsed_s: float


def raw_exchange(
    port: int, request: bytes, *, trickle: Callable[[socket.socket], None] | None = None
) -> RawAnswer:
    """Send ``request`` on a new connection (then call ``trickle``, which may keep sending) and
    read until the server closes or ANSWER_WAIT_S pass; AssertionError if nothing ends it."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WAIT_S) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close mid-send
            sock.sendall(request)
            if trickle:
                trickle(sock)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received:  # the head is all that is looked at
                    break
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(
                f"no answer and no close within {ANSWER_WAIT_S} s; received {received[:200]!r}"
            ) from None
    elapsed = time.monotonic() - started
    head = received.split(b"\r\n\r\n", 1)[0]
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.") else None
    return RawAnswer(status, head, elapsed)


def upgrade_request(path: str, *, extra_headers: bytes = b"") -> bytes:
    """A WebSocket upgrade request for ``path`` (RFC 6455 section 4.1)."""
    return (
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        ).encode()
        + extra_headers
        + b"\r\n"
    )


def get_request(path: str, *, extra_headers: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra_headers + b"\r\n"


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@dataclass
class NormalClient:
    """A well-behaved client doing one request after another on its own thread; each answer is
    checked by ``check`` and its latency kept."""

    request: Callable[[httpx.Client], httpx.Response]
    check: Callable[[httpx.Response], bool]
    latencies_ms: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def run(self, count: int) -> None:
        """``count`` requests, one after another, on this thread."""
        with httpx.Client(timeout=ANSWER_WAIT_S) as client:
            for _ in range(count):
                started = time.perf_counter()
                try:
                    answer = self.request(client)
                except httpx.HTTPError as exc:
                    self.wrong.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
                if not self.check(answer):
                    self.wrong.append(f"{answer.status_code} {answer.text[:200]}")

    def figures(self) -> dict[str, float]:
        return {
            "p50_ms": round(statistics.median(self.latencies_ms), 2) if self.latencies_ms else 0,
            "p99_ms": round(percentile(self.latencies_ms, 0.99), 2),
        }


def measure_during(
    make_client: Callable[[], NormalClient], count: int, flood: Callable[[threading.Event], None]
) -> tuple[NormalClient, NormalClient]:
    """The normal client's ``count`` requests alone, then again while ``flood`` runs on another
    thread (``flood`` stops when its event is set, which happens once the client is done)."""
    quiet = make_client()
    quiet.run(count)
    loud = make_client()
    done = threading.Event()
    flooder = threading.Thread(target=flood, args=(done,), daemon=True)
    flooder.start()
    try:
        loud.run(count)
    finally:
        done.set()
        flooder.join(ANSWER_WAIT_S * 3)
    return quiet, loud


def run_async(coroutine_function: Callable[[threading.Event], object]) -> Callable:
    """A flood written as ``async def flood(done)`` run on its own event loop in the thread."""

    def flood(done: threading.Event) -> None:
        asyncio.run(coroutine_function(done))

    return flood
