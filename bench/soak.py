"""Soak: many WebSocket connections over several server processes, notifications through ingest
at a steady rate, for minutes; then every seq of every connection is checked.

    python bench/soak.py                      # the long form: 25,000 connections, 1,000/s, 10 min
    python bench/soak.py --duration 60 --connections 2000

Needs DATABASE_URL (a Postgres; a fresh database is made beside it) and starts its own
redis-server on a free port and ``--servers`` processes of ``manage.py serve``
(tests/servers.py), never touching shared services. Connections are spread over the servers
and over source addresses 127.0.0.2-9 (one source address has ~28k ephemeral ports), each
subscribed from seq 0 to one of ``--topics`` topics; client processes (bench/soak_clients.py)
hold them, at most ``CONNECTIONS_PER_CLIENT_PROCESS`` each (20,000 open files per process here).
Notifications go round-robin over the topics in batches of ``--batch`` through
``POST /api/v1/notifications/batch``, paced open-loop (a slow answer does not slow the pace).

Printed: RSS of every server process at the start of publishing and at the end (flat when within
10 %), errors (ingest answers other than 202, connection failures, server closes), p50/p95/p99
of ingest -> receipt latency, and per connection received (min/max), lost, duplicated and out of
order against each topic's last seq. ``run()`` returns the same figures (tests/chaos/test_soak.py
runs a bounded form of it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for path in (str(BENCH_DIR), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

from minimal_clients import HttpPoster  # noqa: E402  (bench/ on the path first)
from soak_clients import LATENCY_BUCKET_MS, client_process  # noqa: E402

ORIGIN = "http://soak.invalid"
CONNECTIONS_PER_CLIENT_PROCESS = 8000  # well below 20,000 open files per process
POSTERS_PER_SERVER = 4  # keep-alive ingest connections per server process
RSS_FLAT_RATIO = 0.10  # "flat": end RSS within 10 % of start RSS
PROGRESS_EVERY_S = 10.0
READY_TIMEOUT_S = 600  # every client process has opened its connections (25,000 take minutes)


@dataclass
class SoakOptions:
    connections: int = 25_000
    rate: float = 1000.0  # notifications per second
    duration_s: float = 600.0
    servers: int = 4
    topics: int = 1000
    batch: int = 10  # notifications per ingest request
    warmup_s: float = 10.0  # published at the same pace before the measured window
    drain_s: float = 60.0  # after the last publish, how long the last messages may take


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile() -> int:
    """Raise this process's open-files limit to the hard one; returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile_ms(histogram: Counter, q: float) -> float:
    """The ``q`` quantile (0..1) of a latency histogram of LATENCY_BUCKET_MS-wide buckets."""
    total = sum(histogram.values())
    if not total:
        return float("nan")
    rank = math.ceil(q * total)
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round((bucket + 1) * LATENCY_BUCKET_MS, 1)
    raise AssertionError("unreachable")


class Publisher:
    """Batches of notifications through ingest, round-robin over topics and servers."""

    def __init__(self, ports: list[int], api_key: str, topics: list[str], batch: int) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        self.free: asyncio.Queue[HttpPoster] = asyncio.Queue()
        self.posters = [
            HttpPoster("127.0.0.1", port, headers)
            for _ in range(POSTERS_PER_SERVER)
            for port in ports
        ]
        for poster in self.posters:
            self.free.put_nowait(poster)
        self.topics = topics
        self.batch = batch
        self.next_topic = 0
        self.accepted = 0
        self.last_seqs: dict[str, int] = {}
        self.errors: Counter = Counter()
        self.waited_for_poster = 0  # batches that found every connection busy (behind pace)
        self.warmup_accepted = 0  # of ``accepted``, those of the warm-up

    async def one_batch(self) -> None:
        topics = [self.topics[(self.next_topic + k) % len(self.topics)] for k in range(self.batch)]
        self.next_topic += self.batch
        if self.free.empty():
            self.waited_for_poster += 1
        poster = await self.free.get()
        try:
            sent = time.monotonic()
            items = [
                {"topic": t, "event": "soak.tick", "data": {"soak_sent": sent}} for t in topics
            ]
            body = json.dumps({"notifications": items}).encode()
            status, payload, _ = await poster.post("/api/v1/notifications/batch", body)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.errors[f"ingest: {type(exc).__name__}"] += 1
            return
        finally:
            self.free.put_nowait(poster)
        if status != 202:
            self.errors[f"ingest answered {status}"] += 1
            return
        for topic, result in zip(topics, json.loads(payload)["results"], strict=True):
            self.accepted += 1
            self.last_seqs[topic] = max(self.last_seqs.get(topic, 0), result["seq"])

    async def run(self, rate: float, duration_s: float, progress) -> None:
        """Post for ``duration_s`` at ``rate`` notifications/s, open-loop."""
        interval = self.batch / rate
        start = time.monotonic()
        tasks: set[asyncio.Task] = set()
        k = 0
        next_progress = start + PROGRESS_EVERY_S
        while (due := start + k * interval) < start + duration_s:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self.one_batch())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                progress(time.monotonic() - start)
        await asyncio.gather(*tasks)

    async def aclose(self) -> None:
        for poster in self.posters:
            await poster.aclose()


def _client_specs(options: SoakOptions, ports: list[int], token: str, topics: list[str]):
    processes = max(1, math.ceil(options.connections / CONNECTIONS_PER_CLIENT_PROCESS))
    share = math.ceil(options.connections / processes)
    first = 0
    while first < options.connections:
        count = min(share, options.connections - first)
        yield {
            "host": "127.0.0.1",
            "ports": ports,
            "token": token,
            "origin": ORIGIN,
            "topics": topics,
            "first": first,
            "count": count,
        }
        first += count


def run(options: SoakOptions, workdir: Path, say=print) -> dict:
    """Run one soak (see the module docstring) with its processes' files under ``workdir``;
    returns the figures. Needs Django's settings importable (DJANGO_SETTINGS_MODULE)."""
    from tests.servers import NotifyServer, RedisServer, seed, server_environment

    raise_nofile()
    topics = [f"soak.t{i}" for i in range(options.topics)]
    with (
        RedisServer(workdir) as redis,
        server_environment(
            workdir,
            "soak",
            REDIS_URL=redis.url,
            NOTIFY_ALLOWED_ORIGINS=ORIGIN,
            INGEST_RATE="1000000/s",  # the soak's pace is the limit, not the per-key rate
        ) as env,
    ):
        setup = seed(env)
        servers = [NotifyServer(env, workdir / f"server-{i}.log") for i in range(options.servers)]
        try:
            for server in servers:
                server.spawn()
            for server in servers:
                server.wait_ready()
            return _soak(options, servers, setup, topics, say)
        finally:
            for server in servers:
                server.stop()


def _soak(options: SoakOptions, servers, setup: dict, topics: list[str], say) -> dict:
    ports = [server.port for server in servers]
    context = multiprocessing.get_context("fork")
    clients = []
    for spec in _client_specs(options, ports, setup["tokens"]["sam"], topics):
        ours, theirs = context.Pipe()
        proc = context.Process(target=client_process, args=(spec, theirs), daemon=True)
        proc.start()
        clients.append((proc, ours))
    try:
        t0 = time.monotonic()
        connected = 0
        for proc, pipe in clients:
            connected += _answer(proc, pipe, READY_TIMEOUT_S, "open its connections")["connected"]
        took = time.monotonic() - t0
        say(f"{connected} of {options.connections} connections open in {took:.0f} s")

        def measure() -> dict[int, int]:
            for _, pipe in clients:
                pipe.send(("measure",))
            return {server.pid: _rss_kb(server.pid) for server in servers}

        publisher, rss_start = asyncio.run(
            _publish(options, ports, setup["api_key"], topics, servers, say, measure)
        )
        rss_end = {server.pid: _rss_kb(server.pid) for server in servers}
        for _, pipe in clients:
            pipe.send(("finish", publisher.last_seqs, options.drain_s))
        parts = []
        for proc, pipe in clients:
            parts.append(_answer(proc, pipe, options.drain_s + 120, "report its figures"))
            proc.join(30)
    finally:
        for proc, _ in clients:
            if proc.is_alive():
                proc.kill()
    return _figures(options, parts, publisher, rss_start, rss_end)


def _answer(proc, pipe, timeout_s: float, what: str) -> dict:
    """The next report of a client process; RuntimeError if it exits or ``timeout_s`` pass."""
    deadline = time.monotonic() + timeout_s
    while not pipe.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"a client process exited ({proc.exitcode}) before it could {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"a client process did not {what} in {timeout_s:.0f} s")
    return pipe.recv()[1]


async def _publish(options: SoakOptions, ports, api_key, topics, servers, say, measure):
    """Warm up, then ``measure()`` (returns the servers' RSS), then the measured window;
    returns (the publisher, that RSS)."""
    publisher = Publisher(ports, api_key, topics, options.batch)

    def progress(elapsed: float) -> None:
        rss = ", ".join(f"{_rss_kb(s.pid) // 1024} MB" for s in servers)
        say(
            f"  {elapsed:5.0f} s: {publisher.accepted} accepted, "
            f"{sum(publisher.errors.values())} ingest errors, server RSS {rss}"
        )

    try:
        if options.warmup_s:
            await publisher.run(options.rate, options.warmup_s, lambda _elapsed: None)
            say(f"warmed up: {publisher.accepted} accepted in {options.warmup_s:.0f} s")
        publisher.waited_for_poster = 0
        publisher.warmup_accepted = publisher.accepted
        rss_start = measure()
        await publisher.run(options.rate, options.duration_s, progress)
    finally:
        await publisher.aclose()
    return publisher, rss_start


def _figures(options, parts: list[dict], publisher: Publisher, rss_start, rss_end) -> dict:
    latency: Counter = Counter()
    errors: Counter = Counter(publisher.errors)
    for part in parts:
        latency.update({int(k): v for k, v in part["latency"].items()})
        errors.update(part["errors"])
    growth = {pid: (rss_end[pid] - rss_start[pid]) / rss_start[pid] for pid in rss_start}
    return {
        "options": asdict(options),
        "connections": sum(p["connected"] for p in parts),
        "published": publisher.accepted,
        "published_in_warmup": publisher.warmup_accepted,
        "behind_pace": publisher.waited_for_poster,
        "delivered": sum(p["delivered"] for p in parts),
        "received_per_connection_min": min(p["received_min"] for p in parts),
        "received_per_connection_max": max(p["received_max"] for p in parts),
        "lost": sum(p["lost"] for p in parts),
        "duplicated": sum(p["duplicated"] for p in parts),
        "out_of_order": sum(p["out_of_order"] for p in parts),
        "reconnects": sum(p["reconnects"] for p in parts),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "latency_p50_ms": percentile_ms(latency, 0.50),
        "latency_p95_ms": percentile_ms(latency, 0.95),
        "latency_p99_ms": percentile_ms(latency, 0.99),
        "rss_start_mb": [round(rss_start[pid] / 1024, 1) for pid in rss_start],
        "rss_end_mb": [round(rss_end[pid] / 1024, 1) for pid in rss_start],
        "rss_max_growth_pct": round(100 * max(growth.values()), 1),
        "rss_flat": all(abs(g) <= RSS_FLAT_RATIO for g in growth.values()),
    }


def report(figures: dict) -> str:
    o = figures["options"]
    lines = [
        f"soak: {figures['connections']} connections over {o['servers']} server processes, "
        f"{o['topics']} topics, {o['rate']:.0f} notifications/s in batches of {o['batch']} "
        f"for {o['duration_s']:.0f} s (after {o['warmup_s']:.0f} s of warm-up)",
        f"published {figures['published']} ({figures['published_in_warmup']} of them in the "
        f"warm-up), delivered {figures['delivered']} "
        f"(per connection {figures['received_per_connection_min']}-"
        f"{figures['received_per_connection_max']}), batches behind pace "
        f"{figures['behind_pace']}",
        f"lost {figures['lost']}, duplicated {figures['duplicated']}, out of order "
        f"{figures['out_of_order']}, reconnects {figures['reconnects']}",
        f"errors {figures['errors']} {figures['error_kinds'] or ''}".rstrip(),
        f"ingest -> receipt p50 {figures['latency_p50_ms']} ms, p95 {figures['latency_p95_ms']} "
        f"ms, p99 {figures['latency_p99_ms']} ms",
        f"server RSS start {figures['rss_start_mb']} MB, end {figures['rss_end_mb']} MB: "
        f"{'flat' if figures['rss_flat'] else 'NOT flat'} (largest growth "
        f"{figures['rss_max_growth_pct']} %, flat means within {RSS_FLAT_RATIO:.0%})",
    ]
    return "\n".join(lines)


def clean(figures: dict) -> bool:
    """Every seq to every connection once, in order, and no error."""
    return (
        figures["connections"] == figures["options"]["connections"]
        and figures["lost"] == figures["duplicated"] == figures["out_of_order"] == 0
        and figures["errors"] == 0
    )


def main() -> None:
    defaults = SoakOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="notifications/s")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds")
    parser.add_argument("--servers", type=int, default=defaults.servers)
    parser.add_argument("--topics", type=int, default=defaults.topics)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s, help="seconds")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp") / f"notify-soak-{os.getpid()}")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        parser.error(
            "set DATABASE_URL to a Postgres server: the soak makes a fresh database beside it"
        )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
    import django

    django.setup()
    options = SoakOptions(
        connections=args.connections,
        rate=args.rate,
        duration_s=args.duration,
        servers=args.servers,
        topics=args.topics,
        batch=args.batch,
        warmup_s=args.warmup,
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    figures = run(options, args.workdir)
    print(report(figures))
    print(json.dumps(figures))
    sys.exit(0 if clean(figures) else 1)


if __name__ == "__main__":
    main()
