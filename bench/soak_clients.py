"""The client side of bench/soak.py: one forked process holding its share of the plain WebSocket
connections, each subscribed to one topic from seq 0, reconnecting with ``since`` when closed (as
the JS client does), checking every seq and measuring ingest -> receipt latency.

The latency is read from the notification itself: the publisher writes its ``time.monotonic()``
into ``data.soak_sent`` just before the request goes out, and CLOCK_MONOTONIC is one clock for every
process of the machine. Latencies go into a fixed histogram (``LATENCY_BUCKET_MS`` wide), so
memory stays flat however long the soak runs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

from minimal_clients import WsClient

_SEQ = re.compile(rb'"seq"\s*:\s*(\d+)').search
SENT_RE = re.compile(rb'"soak_sent"\s*:\s*([0-9.]+)')
LOCAL_IPS = [f"127.0.0.{i}" for i in range(2, 10)]  # ~28k ephemeral ports per source address
CONNECT_CONCURRENCY = 200  # handshakes in flight per client process: below uvicorn's backlog
READY_TIMEOUT_S = 60.0
RECONNECT_DELAY_S = 1.0  # a closed connection's pause before it reconnects (a client's backoff)
LATENCY_BUCKET_MS = 0.1
LATENCY_BUCKETS = 600_000  # up to 60 s; slower receipts land in the last bucket


class Seen:
    """Which seqs of its topic one connection received: a bitmap, so duplicates and late
    (out-of-order) arrivals are told apart without a set per connection."""

    __slots__ = ("bits", "max_seq", "received", "duplicated", "out_of_order")

    def __init__(self) -> None:
        self.bits = bytearray(64)
        self.max_seq = 0
        self.received = 0
        self.duplicated = 0
        self.out_of_order = 0

    def add(self, seq: int) -> None:
        byte, bit = divmod(seq, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
        if self.bits[byte] >> bit & 1:
            self.duplicated += 1
            return
        self.bits[byte] |= 1 << bit
        self.received += 1
        if seq < self.max_seq:
            self.out_of_order += 1
        else:
            self.max_seq = seq

    def lost(self, last_seq: int) -> int:
        """Seqs 1..last_seq never received."""
        have = sum(1 for seq in range(1, last_seq + 1) if self._has(seq))
        return last_seq - have

    def _has(self, seq: int) -> bool:
        byte, bit = divmod(seq, 8)
        return byte < len(self.bits) and bool(self.bits[byte] >> bit & 1)


class SoakSocket(WsClient):
    """A ``WsClient`` that hands every notification's seq and send time to its ``Seen`` and the
    process's latency histogram."""

    __slots__ = ("seen", "latency")

    def __init__(self, host: str, path: str, origin: str, seen: Seen, latency: list[int]):
        super().__init__(host, path, origin, deflate=False)
        self.seen = seen
        self.latency = latency

    def _message(self, payload: bytes) -> None:
        seq_match = _SEQ(payload)
        if seq_match is None:
            super()._message(payload)  # pongs, and ``ready`` on the ``subscribed`` frame
            return
        self.seen.add(int(seq_match.group(1)))
        sent = SENT_RE.search(payload)
        if sent is not None:
            ms = (time.monotonic() - float(sent.group(1))) * 1000
            self.latency[min(int(ms / LATENCY_BUCKET_MS), LATENCY_BUCKETS - 1)] += 1


class Connection:
    """One subscriber: its topic, server and source address, kept connected until ``stop``."""

    def __init__(self, spec: dict, index: int, latency: list[int], errors: Counter) -> None:
        self.topic = spec["topics"][index % len(spec["topics"])]
        self.port = spec["ports"][index % len(spec["ports"])]
        self.local_ip = LOCAL_IPS[index % len(LOCAL_IPS)]
        self.spec = spec
        self.seen = Seen()
        self.latency = latency
        self.errors = errors
        self.reconnects = 0
        self.socket: SoakSocket | None = None
        self.stopping = False

    async def open(self) -> None:
        """Connect and subscribe after the highest seq seen (0 at first); raises on failure."""
        host, spec = self.spec["host"], self.spec
        path = f"/ws/{self.topic}/?token={spec['token']}&since={self.seen.max_seq}"
        loop = asyncio.get_running_loop()
        _, sock = await loop.create_connection(
            lambda: SoakSocket(
                f"{host}:{self.port}", path, spec["origin"], self.seen, self.latency
            ),
            host,
            self.port,
            local_addr=(self.local_ip, 0),
        )
        status = await sock.opened
        if status != 101:
            sock.close()
            raise ConnectionError(f"upgrade answered HTTP {status}")
        await asyncio.wait_for(sock.ready, READY_TIMEOUT_S)
        self.socket = sock
        sock.closed.add_done_callback(self._closed)

    def _closed(self, done: asyncio.Future) -> None:
        if self.stopping:
            return
        self.errors[f"closed by server: {done.result()}"] += 1
        asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while not self.stopping:
            await asyncio.sleep(RECONNECT_DELAY_S)
            self.reconnects += 1
            try:
                await self.open()
                return
            except (OSError, TimeoutError) as exc:
                self.errors[f"reconnect failed: {type(exc).__name__}"] += 1

    def stop(self) -> None:
        self.stopping = True
        if self.socket is not None:
            self.socket.close()


async def hold(spec: dict, control) -> dict:
    """Open ``spec["count"]`` connections (global indices from ``spec["first"]``), report
    ``("ready", ...)`` on ``control``; on ``("measure",)`` forget the latencies seen so far (the
    warm-up's); on ``("finish", {topic: last_seq}, drain_s)`` let every connection reach its
    topic's last seq (or ``drain_s`` pass) and return the figures."""
    latency = [0] * LATENCY_BUCKETS
    errors: Counter = Counter()
    connections = [
        Connection(spec, spec["first"] + i, latency, errors) for i in range(spec["count"])
    ]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(conn: Connection) -> bool:
        async with gate:
            try:
                await conn.open()
                return True
            except (OSError, TimeoutError) as exc:
                errors[f"connect failed: {type(exc).__name__}: {exc}"[:120]] += 1
                return False

    opened = await asyncio.gather(*(open_one(c) for c in connections))
    await asyncio.to_thread(control.send, ("ready", {"connected": sum(opened)}))
    while (command := await asyncio.to_thread(control.recv))[0] == "measure":
        latency[:] = [0] * LATENCY_BUCKETS
    _, last_seqs, drain_s = command
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        if all(c.seen.max_seq >= last_seqs.get(c.topic, 0) for c in connections):
            break
        await asyncio.sleep(0.2)  # polling the tallies: the last messages are in flight
    for conn in connections:
        conn.stop()
    received = [c.seen.received for c in connections]
    return {
        "connections": len(connections),
        "connected": sum(opened),
        "received_min": min(received, default=0),
        "received_max": max(received, default=0),
        "delivered": sum(received),
        "lost": sum(c.seen.lost(last_seqs.get(c.topic, 0)) for c in connections),
        "duplicated": sum(c.seen.duplicated for c in connections),
        "out_of_order": sum(c.seen.out_of_order for c in connections),
        "reconnects": sum(c.reconnects for c in connections),
        "errors": dict(errors),
        "latency": {i: n for i, n in enumerate(latency) if n},
    }


def client_process(spec: dict, control) -> None:
    """The forked client process's body: ``hold`` on a fresh event loop, figures sent back."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    control.send(("figures", asyncio.run(hold(spec, control))))
