"""Load-generator side of bench/fanout.py: one coroutine per benchmark part.

Each runs in a client process pinned to the client core (bench/fanout.py forks it), opens its
connections with bench/minimal_clients.py, publishes (through the ingest API for our server, over
a ``/publish`` socket for the bare one), and returns a dict of figures. CPU figures of the server
(and of Redis) are read from /proc by this process at the edges of the measured window.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from minimal_clients import HttpPoster, SeqStats, WsClient, open_sse, open_ws

# Several loopback source addresses: one (src ip, dst ip, dst port) has only ~28k ephemeral ports.
LOCAL_IPS = [f"127.0.0.{i}" for i in range(2, 10)]
CONNECT_CONCURRENCY = 200  # handshakes in flight: below uvicorn's listen backlog
READY_TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_DATA = {"pod": "api-7f9c6d8b5-x2kqp", "namespace": "prod", "reason": "BackOff", "count": 3}
INGEST_BATCH_PATH = "/api/v1/notifications/batch"
INGEST_ONE_PATH = "/api/v1/notifications"


# --- /proc readings -----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cores_busy_s() -> dict[str, float]:
    """Busy seconds per CPU line of /proc/stat (not idle, iowait or steal), and ``steal``: time
    the hypervisor gave to other VMs while we wanted the CPU."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[name] = (sum(v[:7]) - v[3] - v[4]) / CLK_TCK
            if name == "cpu":
                out["steal"] = v[7] / CLK_TCK
    return out


class Window:
    """CPU accounting over one measured window: server, redis, this client, each core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
        self.me0 = time.process_time()
        self.cores0 = cores_busy_s()

    def close(self) -> dict:
        wall = time.monotonic() - self.t0
        out = {"window_s": round(wall, 3)}
        ours = 0.0
        for name, pid in self.pids.items():
            used = proc_cpu_s(pid) - self.cpu0[name]
            ours += used
            out[f"{name}_cpu_pct"] = round(100 * used / wall, 1)
            out[f"{name}_cpu_s"] = round(used, 3)
        me = time.process_time() - self.me0
        ours += me
        out["client_cpu_pct"] = round(100 * me / wall, 1)
        cores1 = cores_busy_s()
        for name in cores1:
            if name not in ("cpu", "steal"):
                out[f"{name}_busy_pct"] = round(100 * (cores1[name] - self.cores0[name]) / wall, 1)
        # What ran besides us (other helpers' tests, kernel softirq not charged to our pids).
        other = cores1["cpu"] - self.cores0["cpu"] - ours
        out["other_cpu_pct"] = round(100 * max(other, 0.0) / wall, 1)
        out["steal_pct"] = round(100 * (cores1["steal"] - self.cores0["steal"]) / wall, 1)
        return out


# --- publishers ---------------------------------------------------------------------------------


def bench_item(topic: str, i: int) -> dict:
    return {"topic": topic, "event": "bench.tick", "data": {**BENCH_DATA, "i": i}}


class IngestPublisher:
    """Publishes through our ingest API over a few keep-alive connections."""

    def __init__(self, cfg: dict, topic: str, connections: int = 4) -> None:
        headers = {"Authorization": f"Bearer {cfg['api_key']}"}
        self.posters = [HttpPoster(cfg["host"], cfg["port"], headers) for _ in range(connections)]
        self.free: asyncio.Queue[HttpPoster] = asyncio.Queue()
        for poster in self.posters:
            self.free.put_nowait(poster)
        self.topic = topic
        self.counter = 0
        self.answer_ms: list[float] = []

    async def one(self) -> tuple[int, float]:
        """POST one notification; returns (seq, monotonic time the request was written).
        The answer's delay (written -> 202 parsed) is appended to ``answer_ms``."""
        poster = await self.free.get()
        try:
            self.counter += 1
            body = json.dumps(bench_item(self.topic, self.counter)).encode()
            status, payload, sent = await poster.post(INGEST_ONE_PATH, body)
            self.answer_ms.append((time.monotonic() - sent) * 1000)
        finally:
            self.free.put_nowait(poster)
        if status != 202:
            raise RuntimeError(f"ingest answered {status}: {payload[:300]!r}")
        return json.loads(payload)["seq"], sent

    async def batch(self, count: int, batch_size: int) -> list[tuple[int, float]]:
        """POST ``count`` notifications in batches sent concurrently; returns (seq, sent) each."""

        async def post(items: list[dict]) -> list[tuple[int, float]]:
            poster = await self.free.get()
            try:
                body = json.dumps(batch_body(items)).encode()
                status, payload, sent = await poster.post(INGEST_BATCH_PATH, body)
            finally:
                self.free.put_nowait(poster)
            if status not in (200, 202):
                raise RuntimeError(f"batch ingest answered {status}: {payload[:300]!r}")
            return [(seq, sent) for seq in batch_seqs(json.loads(payload))]

        chunks = []
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            chunks.append([bench_item(self.topic, self.counter + k) for k in range(size)])
            self.counter += size
        results = await asyncio.gather(*(post(chunk) for chunk in chunks))
        return [pair for chunk in results for pair in chunk]

    async def aclose(self) -> None:
        for poster in self.posters:
            await poster.aclose()


def batch_body(items: list[dict]) -> dict:
    """Request body of POST /api/v1/notifications/batch."""
    return {"notifications": items}


def batch_seqs(answer) -> list[int]:
    """Seqs from the batch answer (a list of per-item results, or an object holding one)."""
    if isinstance(answer, dict):
        for key in ("results", "items", "notifications"):
            if key in answer:
                answer = answer[key]
                break
    return [item["seq"] for item in answer]


class BarePublisher:
    """Publishes over a ``/publish`` socket of the bare server, envelopes shaped like ours."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.ws: WsClient | None = None
        self.seq = 0

    async def open(self) -> None:
        cfg = self.cfg
        self.ws = await open_ws(cfg["host"], cfg["port"], "/publish", origin=None, deflate=False)

    def _envelope(self) -> bytes:
        self.seq += 1
        return json.dumps(
            {
                "type": "notification",
                "topic": "bench.bare",
                "seq": self.seq,
                "id": str(uuid.uuid4()),
                "event": "bench.tick",
                "data": {**BENCH_DATA, "i": self.seq},
                "severity": "info",
                "source": "api",
                "ts": datetime.now(UTC).isoformat(),
            }
        ).encode()

    async def one(self) -> tuple[int, float]:
        frame = self._envelope()
        sent = time.monotonic()
        self.ws.send_text(frame)
        return self.seq, sent

    async def batch(self, count: int, batch_size: int) -> list[tuple[int, float]]:
        out = []
        for _ in range(count):
            out.append(await self.one())
        return out

    async def aclose(self) -> None:
        if self.ws is not None:
            self.ws.close()


class BusPublisher:
    """Our server without ingest: PUBLISHes envelopes straight on the hub's Redis channel (the
    step after ingest's commit), to take the fanout path's own latency apart. Seqs start at 1 on a
    topic no one ingests into, which the hub accepts as the topic's next (its stored last is 0)."""

    def __init__(self, cfg: dict, topic: str) -> None:
        self.cfg = cfg
        self.channel = f"{cfg['redis_prefix']}:hub:{topic}".encode()
        self.topic = topic
        self.seq = 0
        self.lock = asyncio.Lock()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        host, port = self.cfg["redis_addr"]
        self.reader, self.writer = await asyncio.open_connection(host, port)

    async def one(self) -> tuple[int, float]:
        self.seq += 1
        envelope = json.dumps(
            {
                "type": "notification",
                "topic": self.topic,
                "seq": self.seq,
                "id": str(uuid.uuid4()),
                "event": "bench.tick",
                "data": {**BENCH_DATA, "i": self.seq},
                "severity": "info",
                "source": "api",
                "ts": datetime.now(UTC).isoformat(),
            },
            separators=(",", ":"),
        ).encode()
        parts = [b"PUBLISH", self.channel, envelope]
        command = b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        seq = self.seq
        async with self.lock:  # one reply at a time on this connection
            sent = time.monotonic()
            self.writer.write(command)
            await self.reader.readline()  # ":<receivers>"
        return seq, sent

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def make_publisher(cfg: dict, topic: str):
    if cfg.get("bus"):
        bus = BusPublisher(cfg, topic)
        await bus.open()
        return bus
    if cfg["target"] == "bare":
        pub = BarePublisher(cfg)
        await pub.open()
        return pub
    return IngestPublisher(cfg, topic)


async def publish_paced(pub, count: int, rate: float) -> dict[int, float]:
    """Publish ``count`` single messages open-loop at ``rate``/s (a slow answer does not delay
    the next one); returns {seq: monotonic time its request was written}."""
    start = time.monotonic() + 0.05
    tasks = []
    for k in range(count):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(pub.one()))
    return dict(await asyncio.gather(*tasks))


# --- connections ----------------------------------------------------------------------------------


async def connect_many(cfg: dict, count: int, path: str, *, offset: int = 0, sse: bool = False):
    """Open ``count`` subscribers; returns (clients, error messages). A WebSocket counts as open
    once its first text frame (``subscribed`` / hello) arrived; an SSE stream once its headers did.
    Connection ``offset + i`` goes to ``cfg["ports"][(offset + i) % len]`` when several servers."""
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    host = cfg["host"]
    ports = cfg.get("ports") or [cfg["sse_port" if sse else "port"]]

    async def one(i: int):
        port = ports[(offset + i) % len(ports)]
        async with sem:
            if sse:
                return await open_sse(host, port, path)
            client = await open_ws(
                host,
                port,
                path,
                origin=cfg.get("origin"),
                deflate=cfg.get("deflate", False),
                local_ip=LOCAL_IPS[(offset + i) % len(LOCAL_IPS)],
            )
            await asyncio.wait_for(client.ready, READY_TIMEOUT_S)
            return client

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    clients = [r for r in results if not isinstance(r, BaseException)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return clients, errors


class Completion:
    """Resolves when every expecting connection has reached its target seq."""

    def __init__(self, clients, after_seq: int, target: int) -> None:
        self.clients = clients
        self.pending = len(clients)
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for client in clients:
            client.stats.expect(after_seq, target, self._one_done)
        if not self.pending:
            self.future.set_result(None)

    def _one_done(self) -> None:
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(None)

    def retarget(self, target: int) -> None:
        """Move the target of connections not yet done (publishers learn seqs from answers)."""
        for client in self.clients:
            stats = client.stats
            if stats.on_target is None:
                continue
            stats.target = target
            if stats.last_seq >= target:
                callback, stats.on_target = stats.on_target, None
                callback()

    async def wait(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.future), timeout_s)
            return True
        except TimeoutError:
            return False


def delivery_summary(clients, expected_each: int) -> dict:
    stats: list[SeqStats] = [c.stats for c in clients]
    closed = [c.close_code for c in clients if getattr(c, "close_code", None) is not None]
    return {
        "subscribers": len(clients),
        "expected": expected_each * len(clients),
        "delivered": sum(s.received for s in stats),
        "missing": sum(max(expected_each - s.received, 0) for s in stats),
        "duplicates": sum(s.dups for s in stats),
        "gaps": sum(s.gaps for s in stats),
        "closed": len(closed),
        "close_codes": sorted(set(closed)),
    }


def close_all(clients) -> None:
    for client in clients:
        client.close()


# Talks to bench/fanout.py: ``await ctl(kind, data)`` sends a report and returns the answer.
Control = Callable[[str, object], Awaitable[object]]


# --- parts ----------------------------------------------------------------------------------------


def _pids(cfg: dict) -> dict[str, int]:
    return {name: pid for name, pid in cfg["pids"].items() if pid}


async def part_fanout(cfg: dict, ctl: Control) -> dict:
    """Delivered msg/s: N messages published as fast as the publisher can to S subscribers.

    The clock runs from the first publish request written to the last subscriber's last message.
    """
    sse = cfg.get("sse", False)
    clients, errors = await connect_many(cfg, cfg["subscribers"], cfg["path"], sse=sse)
    if not clients:
        return {"error": "no subscriber connected", "connect_errors": errors[:5]}
    pub = await make_publisher(cfg, cfg["topic"])
    try:
        # Warm-up: code paths, the server's topic subscription; SSE streams give no "subscribed"
        # signal, so keep publishing until every stream has seen one event.
        warm = Completion(clients, -1, 0)
        for _ in range(100):
            last = max(seq for seq, _ in await pub.batch(cfg["warmup"], cfg["batch"]))
            warm.retarget(last)
            if await warm.wait(1.0 if sse else READY_TIMEOUT_S):
                break
        else:
            return {"error": "warm-up never reached every subscriber", **_conn(clients, errors)}
        n = cfg["messages"]
        done = Completion(clients, last, last + n)
        await ctl("measure", "fanout")
        window = Window(_pids(cfg))
        if cfg.get("pace_per_s"):
            # One message at a time: each crosses the server alone (no burst to batch).
            sent = sorted((await publish_paced(pub, n, cfg["pace_per_s"])).items())
        else:
            # Concurrent batches commit in any order: sort by seq.
            sent = sorted(await pub.batch(n, cfg["batch"]))
        if [seq for seq, _ in sent] != list(range(last + 1, last + n + 1)):
            got = f"{sent[0][0]}..{sent[-1][0]} ({len(sent)})"
            return {"error": f"seqs moved under us: expected {last + 1}..{last + n}, got {got}"}
        finished = await done.wait(cfg["timeout_s"])
        cpu = window.close()
        t0 = min(t for _, t in sent)
        t_end = max(c.stats.t_last for c in clients)
        t_first = min((c.stats.t_first for c in clients if c.stats.t_first), default=t0)
        summary = delivery_summary(clients, n)
        elapsed = t_end - t0
        server_s = cpu.get("server_cpu_s", 0.0)
        return {
            "server_us_per_delivery": round(1e6 * server_s / max(summary["delivered"], 1), 2),
            "finished": finished,
            "msgs_per_s": round(summary["delivered"] / elapsed) if elapsed > 0 else 0,
            "fanout_only_msgs_per_s": round(summary["delivered"] / (t_end - t_first))
            if t_end > t_first
            else 0,
            "elapsed_s": round(elapsed, 3),
            "deflate_negotiated": sum(getattr(c, "deflate_negotiated", False) for c in clients),
            **summary,
            **cpu,
            "connect_errors": errors[:3],
            "connect_failed": len(errors),
        }
    finally:
        await pub.aclose()
        close_all(clients)


def _conn(clients, errors) -> dict:
    return {"connected": len(clients), "connect_failed": len(errors), "errors": errors[:3]}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def part_latency(cfg: dict, ctl: Control) -> dict:
    """End-to-end latency: publish request written -> subscriber received, same process clock,
    open-loop at ``rate`` messages/s (a late answer does not delay the next publish)."""
    clients, errors = await connect_many(cfg, cfg["subscribers"], cfg["path"])
    if not clients:
        return {"error": "no subscriber connected", "connect_errors": errors[:5]}
    pub = await make_publisher(cfg, cfg["topic"])
    rate, n = cfg["rate"], cfg["messages"]
    try:
        warm = Completion(clients, -1, 0)
        warm_sent = await publish_paced(pub, cfg["warmup"], rate)
        last = max(warm_sent)
        warm.retarget(last)
        if not await warm.wait(READY_TIMEOUT_S):
            return {"error": "warm-up never reached every subscriber", **_conn(clients, errors)}
        done = Completion(clients, last, last + n)
        for c in clients:
            c.stats.record = []
        answers = getattr(pub, "answer_ms", [])
        answers.clear()
        await ctl("measure", "latency")
        window = Window(_pids(cfg))
        sent = await publish_paced(pub, n, rate)
        finished = await done.wait(cfg["timeout_s"])
        cpu = window.close()
        lat = sorted(
            (t - sent[seq]) * 1000 for c in clients for seq, t in c.stats.record if seq in sent
        )
        return {
            "finished": finished,
            "rate_per_s": rate,
            "samples": len(lat),
            "p50_ms": round(_percentile(lat, 50), 3),
            "p95_ms": round(_percentile(lat, 95), 3),
            "p99_ms": round(_percentile(lat, 99), 3),
            "max_ms": round(lat[-1], 3) if lat else None,
            # ours: POST written -> 202 parsed (the answer may come after the deliveries)
            "answer_p50_ms": round(_percentile(sorted(answers), 50), 3) if answers else None,
            "answer_p99_ms": round(_percentile(sorted(answers), 99), 3) if answers else None,
            **delivery_summary(clients, n),
            **cpu,
            "connect_failed": len(errors),
        }
    finally:
        await pub.aclose()
        close_all(clients)


async def part_idle_memory(cfg: dict, ctl: Control) -> dict:
    """Server memory per idle connection: RSS growth from 1 to ``first`` subscribed sockets."""
    pid, path, first = cfg["pids"]["server"], cfg["path"], cfg["first"]
    clients, errors = await connect_many(cfg, 1, path)
    if not clients:
        return {"error": "first connection failed", "connect_errors": errors}
    try:
        # The first socket paid for lazy imports and pools: the baseline is taken after it.
        await asyncio.sleep(cfg["settle_s"])
        rss0 = proc_rss_kb(pid)
        await ctl("measure", "connect")  # a profiler, if any, samples the connection storm
        t = time.monotonic()
        more, errs = await connect_many(cfg, first - 1, path, offset=1)
        rate = len(more) / (time.monotonic() - t)
        clients += more
        errors += errs
        await asyncio.sleep(cfg["settle_s"])
        rss1 = proc_rss_kb(pid)
        # One message to all of them: how long until the first and the last has it.
        pub = await make_publisher(cfg, cfg["topic"])
        try:
            done = Completion(clients, -1, 0)
            [(seq, sent)] = await pub.batch(1, 1)
            done.retarget(seq)
            reached_all = await done.wait(READY_TIMEOUT_S)
        finally:
            await pub.aclose()
        firsts = [c.stats.t_first for c in clients if c.stats.t_first]
        return {
            "connections": len(clients),
            "connect_failed": len(errors),
            "connect_errors": sorted(set(errors))[:3],
            "connects_per_s": round(rate),
            "rss_base_mb": round(rss0 / 1024, 1),
            "rss_loaded_mb": round(rss1 / 1024, 1),
            "kb_per_idle_conn": round((rss1 - rss0) / max(len(clients) - 1, 1), 1),
            "publish_reached_all": reached_all,
            "publish_to_first_s": round(min(firsts) - sent, 3) if firsts else None,
            "publish_to_last_s": round(max(firsts) - sent, 3) if firsts else None,
        }
    finally:
        close_all(clients)


async def part_idle_hold(cfg: dict, ctl: Control) -> dict:
    """This process's share of the held connections (global indexes ``range``): connect, report,
    hold while the orchestrator waits, report what closed, then wait for the one message the
    orchestrator publishes (its seq is the answer to "armed")."""
    start, end = cfg["range"]
    t = time.monotonic()
    clients, errors = await connect_many(cfg, end - start, cfg["path"], offset=start)
    rate = len(clients) / (time.monotonic() - t)
    try:
        await ctl("connected", {"opened": len(clients), "failed": len(errors)})
        closed = [c.close_code for c in clients if c.closed.done()]
        live = [c for c in clients if not c.closed.done()]
        done = Completion(live, -1, 0)
        seq = await ctl("armed", {"closed_in_hold": len(closed)})
        done.retarget(seq)
        await done.wait(cfg["timeout_s"])
        return {
            "opened": len(clients),
            "connect_failed": len(errors),
            "connect_errors": sorted(set(errors))[:3],
            "connects_per_s": round(rate),
            "closed_in_hold": len(closed),
            "close_codes": sorted({c for c in closed if c is not None}),
            "reached": sum(1 for c in live if c.stats.last_seq >= seq),
            "t_first": min((c.stats.t_first for c in live if c.stats.t_first), default=0.0),
            "t_last": max((c.stats.t_last for c in live), default=0.0),
        }
    finally:
        close_all(clients)


PARTS = {
    "fanout": part_fanout,
    "latency": part_latency,
    "idle_memory": part_idle_memory,
    "idle_hold": part_idle_hold,
}
