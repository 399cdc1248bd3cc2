"""Ingest benchmark: accepted notifications/s and latency of the HTTP ingest API.

    python bench/ingest.py [--duration 10] [--clients 50] [--batch-size 100] [--topics 10]

Starts everything itself: a fresh Postgres database (on the server of BENCH_PG_URL, default
postgres://postgres@127.0.0.1:5432/), migrations, an API key, and uvicorn (the production ASGI
server, with ``manage.py serve``'s command line) in Redis mode (REDIS_URL, default
redis://127.0.0.1:6379/0), DEBUG off, pinned with taskset to core 0, while this load generator
(asyncio, a minimal HTTP/1.1 client: see Http11Connection) pins itself to core 1. Postgres and
Redis are not pinned. Phases, each a warm-up then a measured window:

- single posts: ``--clients`` concurrent clients, each POSTing one notification at a time;
- batches: ``--batch-clients`` concurrent clients POSTing ``--batch-size`` notifications each;
- light load: one client POSTing ``--paced-rate`` single notifications per second (the latency
  of a durable commit when nothing else is going on: group commit has nothing to group).

The limits, measured in the same run (bench/ingest_limits.py): the same loads against a bare
ASGI app on the same server core; pgbench running the single post's own statement from
``--clients`` connections, one transaction each, and paced from one connection; a COPY of
``--batch-size``-row transactions from one client. Each figure is printed beside its ratio to
its limit: on a machine shared with other work, compare ratios rather than absolute figures.
Prints the machine, versions, accepted notifications/s, p50/p95/p99 latency, the server's CPU use
and RSS, and the load generator's CPU use (near 100 % means the figure is the generator's limit).
Afterwards it checks that every accepted notification is stored and each topic's seqs are 1..N.
``--metrics both`` (the default) measures notify twice, a server with metrics recording and one
without (``METRICS_ENABLED``), and prints what recording costs in throughput and CPU per
notification (``--rounds N``: N servers per mode, alternating the order, summed); ``on`` or
``off`` measures one of them. Not part of the test suite.
``--profile`` records the server with py-spy during the single phase.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx
import psycopg
from ingest_limits import Limit, copy_limit, statement_limit
from served import served_argv

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60
SAMPLE_EVERY_S = 0.25  # RSS sampling period
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    name: str
    items_per_request: int
    latencies_s: list[float] = field(default_factory=list)
    rate_per_client: float | None = None  # paced: requests/s per client, else back to back
    accepted_requests: int = 0
    other_statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    window_s: float = 0.0
    server_cpu_pct: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_pct: float = 0.0
    peak_rss_kb: int = 0

    @property
    def accepted_per_s(self) -> float:
        return self.accepted_requests * self.items_per_request / self.window_s

    @property
    def cpu_us_per_item(self) -> float:
        accepted = self.accepted_requests * self.items_per_request
        return 1e6 * self.server_cpu_s / accepted if accepted else float("nan")

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bare_app(scope: dict, receive, send) -> None:
    """The limit: an ASGI app that reads the body and answers 202, nothing else."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"id":"-","topic":"-","seq":0}'})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_db(url: str, name: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{name}"))


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def descendants(pid: int) -> list[int]:
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:  # a thread ended while we looked
                continue
            found += children
            frontier += children
    return found


def rss_kb(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except FileNotFoundError:
            continue
        total += sum(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total


def server_cpu_ticks(pid: int) -> int:
    return sum(cpu_ticks(p) for p in descendants(pid))


def machine_report(pg_url: str, redis_url: str) -> list[str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
        fsync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    import redis

    redis_version = redis.Redis.from_url(redis_url).info("server")["redis_version"]
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("django", "django-ninja", "uvicorn", "uvloop", "httptools", "psycopg", "httpx")
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return [
        f"CPU: {model}, {os.cpu_count()} cores, {mem_kb // 1024} MB RAM, {platform.platform()}",
        f"Python {platform.python_version()}; {versions}",
        f"PostgreSQL {pg_version} (synchronous_commit={fsync}), Redis {redis_version}",
    ]


def manage(env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def start_server(
    env: dict, port: int, core: int, workers: int, app: str = "notify_project.asgi:application"
) -> subprocess.Popen:
    """notify as ``manage.py serve`` runs it (bench/served.py), or ``app`` (the bare one) on
    plain uvicorn."""
    if app == "notify_project.asgi:application":
        argv = served_argv(env, port, workers)
    else:
        argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--no-access-log", "--app-dir", str(ROOT / "bench")]
    argv += ["--log-level", "warning"]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    return subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)


def wait_ready(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before answering")
        try:
            if httpx.get(f"{base}/api/v1/openapi.json", timeout=2).status_code in (200, 202):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not answer in time")


def notification(client: int, n: int, topics: int) -> dict:
    return {
        "topic": f"bench.t{(client + n) % topics}",
        "event": "bench.tick",
        "severity": "info",
        "data": {"client": client, "n": n, "note": "a typical small payload of some bytes"},
    }


class Http11Connection:
    """A minimal HTTP/1.1 keep-alive connection for the load generator.

    Why not httpx: on this machine its per-request cost was the bottleneck. Against the bare ASGI
    app, one sequential client got 196 requests/s with httpx and 1,083 with this; 50 concurrent
    clients about 100 with httpx and 6,579 with this.
    """

    def __init__(self, host: str, port: int, path: str, key: str):
        self.host, self.port = host, port
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body``; return (status, response body). Raises OSError or
        asyncio.IncompleteReadError when the connection breaks (the next call reconnects)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
            status = int(head[9:12])
            if b"content-length:" in head:
                length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                data = await self.reader.readexactly(length)
            else:  # chunked
                data = b""
                while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                    data += (await self.reader.readexactly(size + 2))[:-2]
                await self.reader.readexactly(2)
            if b"connection: close" in head:
                self.close()
            return status, data
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_phase(
    base: str,
    key: str,
    phase: Phase,
    clients: int,
    topics: int,
    warmup_s: float,
    duration_s: float,
    server_pid: int,
) -> Phase:
    parsed = urlparse(base)
    path = "/api/v1/notifications" + ("/batch" if phase.items_per_request > 1 else "")
    measuring = asyncio.Event()
    stop = asyncio.Event()

    async def worker(client_no: int) -> None:
        connection = Http11Connection(parsed.hostname, parsed.port, path, key)
        n = 0
        next_at = time.perf_counter()
        while not stop.is_set():
            if phase.rate_per_client:
                next_at += 1 / phase.rate_per_client
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if phase.items_per_request == 1:
                body = notification(client_no, n, topics)
            else:
                body = {
                    "notifications": [
                        notification(client_no, n + i, topics)
                        for i in range(phase.items_per_request)
                    ]
                }
            n += phase.items_per_request
            started = time.perf_counter()
            try:
                status, _ = await connection.post(json.dumps(body).encode())
            except (OSError, asyncio.IncompleteReadError, ValueError):
                phase.transport_errors += measuring.is_set() and not stop.is_set()
                continue
            elapsed = time.perf_counter() - started
            if not measuring.is_set() or stop.is_set():
                continue
            if status == 202:
                phase.accepted_requests += 1
                phase.latencies_s.append(elapsed)
            else:
                phase.other_statuses[status] = phase.other_statuses.get(status, 0) + 1
        connection.close()

    async def sample_rss() -> None:
        while not stop.is_set():
            phase.peak_rss_kb = max(phase.peak_rss_kb, rss_kb(server_pid))
            await asyncio.sleep(SAMPLE_EVERY_S)

    tasks = [asyncio.create_task(worker(c)) for c in range(clients)]
    sampler = asyncio.create_task(sample_rss())
    await asyncio.sleep(warmup_s)
    server_before, client_before = server_cpu_ticks(server_pid), time.process_time()
    started = time.perf_counter()
    measuring.set()
    await asyncio.sleep(duration_s)
    stop.set()
    phase.window_s = time.perf_counter() - started
    phase.server_cpu_s = (server_cpu_ticks(server_pid) - server_before) / CLK_TCK
    phase.server_cpu_pct = 100 * phase.server_cpu_s / phase.window_s
    phase.client_cpu_pct = 100 * (time.process_time() - client_before) / phase.window_s
    await asyncio.gather(*tasks, sampler)
    return phase


def check_stored(db_url: str) -> str:
    """Every acknowledged notification is stored, and per topic the seqs are exactly 1..N."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT t.name, count(n.id), min(n.seq), max(n.seq), t.last_seq "
            "FROM routing_app_topic t JOIN routing_app_notification n ON n.topic_id = t.id "
            "GROUP BY t.name, t.last_seq"
        ).fetchall()
    total = sum(r[1] for r in rows)
    bad = [r for r in rows if not (r[1] == r[3] == r[4] and r[2] == 1)]
    verdict = "seqs gap-free" if not bad else f"SEQ PROBLEM in {bad[:3]}"
    return f"{total} notifications stored in {len(rows)} topics; {verdict}"


def report(phase: Phase, *limits: Phase | Limit) -> str:
    others = f"; other statuses {phase.other_statuses}" if phase.other_statuses else ""
    if phase.transport_errors:
        others += f"; {phase.transport_errors} transport errors"
    if phase.rate_per_client:  # paced: the figure is the latency
        ratio = "".join(
            f" (p50 {phase.percentile_ms(0.5) / limit.percentile_ms(0.5):.1f}x, p99 "
            f"{phase.percentile_ms(0.99) / limit.percentile_ms(0.99):.1f}x {_short(limit)})"
            for limit in limits
        )
    else:
        ratio = "".join(
            f" ({phase.accepted_per_s / _per_s(limit):.2f}x {_short(limit)})" for limit in limits
        )
    return (
        f"{phase.name}: {phase.accepted_per_s:,.0f} notifications/s accepted; latency "
        f"p50 {phase.percentile_ms(0.50):.2f} ms, p95 {phase.percentile_ms(0.95):.2f} ms, "
        f"p99 {phase.percentile_ms(0.99):.2f} ms{ratio}\n    server CPU "
        f"{phase.server_cpu_pct:.0f} % of "
        f"a core = {phase.cpu_us_per_item:,.0f} us per notification; "
        f"peak RSS {phase.peak_rss_kb / 1024:.0f} MB;"
        f" load generator CPU {phase.client_cpu_pct:.0f} %{others}"
    )


def _per_s(limit: Phase | Limit) -> float:
    return limit.accepted_per_s if isinstance(limit, Phase) else limit.per_s


def _short(limit: Phase | Limit) -> str:
    return "the bare app" if isinstance(limit, Phase) else "Postgres alone"


def paced_phase(args: argparse.Namespace, label: str = "") -> Phase:
    return Phase(
        f"light load: single posts x1 at {args.paced_rate:.0f}/s{label}",
        1,
        rate_per_client=args.paced_rate,
    )


def ours(
    args: argparse.Namespace, base: str, key: str, pid: int, label: str, profile: bool
) -> tuple[Phase, Phase, Phase]:
    """The single-post, the batch and the light-load phase against one notify server."""
    profiler = None
    if args.profile and profile:
        out = Path(f"/tmp/notify-ingest-profile-{os.getpid()}.svg")
        profiler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "-o",
                str(out),
                "--duration",
                str(int(args.warmup + args.duration)),
                "--rate",
                "200",
            ],
        )
    single = asyncio.run(
        run_phase(
            base,
            key,
            Phase(f"single posts x{args.clients}{label}", 1),
            args.clients,
            args.topics,
            args.warmup,
            args.duration,
            pid,
        )
    )
    if profiler:
        profiler.wait()
        print(f"py-spy flame graph: {out}")
    batch = asyncio.run(
        run_phase(
            base,
            key,
            Phase(f"batches of {args.batch_size} x{args.batch_clients}{label}", args.batch_size),
            args.batch_clients,
            args.topics,
            args.warmup,
            args.duration,
            pid,
        )
    )
    paced = asyncio.run(
        run_phase(
            base, key, paced_phase(args, label), 1, args.topics, args.warmup, args.duration, pid
        )
    )
    return single, batch, paced


def metrics_cost(on: list[tuple[Phase, ...]], off: list[tuple[Phase, ...]]) -> str:
    """What recording metrics costs: throughput and server CPU per notification with it against
    without, each summed over the rounds."""
    parts = []
    for index, name in enumerate(("single posts", "batches", "light load")):
        with_metrics, without = [run[index] for run in on], [run[index] for run in off]
        ratio = sum(p.accepted_per_s for p in with_metrics) / sum(p.accepted_per_s for p in without)
        cpu = _cpu_per_item(with_metrics) / _cpu_per_item(without)
        parts.append(f"{name}: throughput {ratio:.3f}x, server CPU per notification {cpu:.3f}x")
    return f"metrics on vs off over {len(on)} round(s): " + "; ".join(parts)


def _cpu_per_item(phases: list[Phase]) -> float:
    items = sum(p.accepted_requests * p.items_per_request for p in phases)
    return sum(p.server_cpu_s for p in phases) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=50, help="concurrent single posters")
    parser.add_argument("--batch-clients", type=int, default=16, help="concurrent batch posters")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--topics", type=int, default=10, help="topics the load spreads over")
    parser.add_argument(
        "--paced-rate", type=float, default=50.0, help="light load: single posts/s from one client"
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="py-spy the single phase")
    parser.add_argument(
        "--metrics",
        choices=("on", "off", "both"),
        default="both",
        help="metrics recording in the server; both = a server with and one without, in turn",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="servers per mode, alternating the order"
    )
    args = parser.parse_args()

    pg_server = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    db_name = f"notify_bench_{os.getpid()}"
    db_url = with_db(pg_server, db_name)
    print("\n".join(machine_report(pg_server, redis_url)))

    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"bench{os.getpid()}",
        "DEBUG": "false",
        "SECRET_KEY": "bench-only-not-secret",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }
    try:
        manage(env, "migrate", "--noinput", "-v0")
        key = manage(env, "apikey", "create", "bench", "--rate", "1000000/s").strip()
        os.sched_setaffinity(0, {args.client_core})
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        bare = start_server(env, port, args.server_core, 1, app="ingest:bare_app")
        try:
            wait_ready(base, bare)
            limit = asyncio.run(
                run_phase(
                    base,
                    key,
                    Phase(f"bare ASGI app x{args.clients} (the limit)", 1),
                    args.clients,
                    args.topics,
                    args.warmup,
                    args.duration,
                    bare.pid,
                )
            )
            bare_paced = asyncio.run(
                run_phase(
                    base,
                    key,
                    paced_phase(args, " (the bare app)"),
                    1,
                    args.topics,
                    args.warmup,
                    args.duration,
                    bare.pid,
                )
            )
        finally:
            os.killpg(bare.pid, signal.SIGTERM)
            bare.wait(timeout=30)
        pg_single = statement_limit(db_url, args.clients, args.duration, args.topics)
        pg_paced = statement_limit(db_url, 1, args.duration, args.topics, rate=args.paced_rate)
        pg_copy = copy_limit(db_url, args.batch_size, args.duration, args.topics)
        print(
            f"uvicorn ({args.workers} worker(s)) on core {args.server_core}, load generator on "
            f"core {args.client_core}; {args.topics} topics; {args.warmup:.0f} s warm-up + "
            f"{args.duration:.0f} s measured per phase"
        )
        print(report(limit))
        print(report(bare_paced))
        for pg_limit in (pg_single, pg_paced, pg_copy):
            print(pg_limit.line())
        modes = {"on": [True], "off": [False], "both": [True, False]}[args.metrics]
        # Rounds alternate the order (on, off, off, on, ...) so that drift (a growing table,
        # autovacuum, other work) weighs on both alike.
        order = [m for r in range(args.rounds) for m in (modes if r % 2 == 0 else modes[::-1])]
        runs: dict[bool, list[tuple[Phase, ...]]] = {m: [] for m in modes}
        for recording in order:
            # Each mode gets a server of its own, so the one without metrics never pays for them.
            mode_env = {
                **env,
                "METRICS_ENABLED": "true" if recording else "false",
                "METRICS_DIR": f"/tmp/notify-bench-metrics-{os.getpid()}",
            }
            label = f" (metrics {'on' if recording else 'off'})" if len(modes) > 1 else ""
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            server = start_server(mode_env, port, args.server_core, args.workers)
            try:
                wait_ready(base, server)
                phases = ours(args, base, key, server.pid, label, profile=not any(runs.values()))
                runs[recording].append(phases)
                single, batch, paced = phases
                print(report(single, limit, pg_single))
                print(report(batch, pg_copy))
                print(report(paced, bare_paced, pg_paced))
                print(f"idle server RSS after the run: {rss_kb(server.pid) / 1024:.0f} MB")
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
        if len(runs) == 2:
            print(metrics_cost(runs[True], runs[False]))
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"load average now {' '.join(load)} (other processes share these cores)")
        print(check_stored(db_url))
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
