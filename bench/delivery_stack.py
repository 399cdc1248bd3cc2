"""What bench/delivery.py starts and measures: the database, notify's server and Celery worker with
``manage.py serve``'s command lines, the channels it sends through, and CPU and memory accounting
by process group. Helpers shared with bench/ingest.py are imported from it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psycopg
from ingest import CLK_TCK, descendants, free_port, rss_kb, with_db

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90  # a cold Django + Celery start on a busy 2-core machine
STOP_TIMEOUT_S = 15
HOOK_SECRET = "whsec_YmVuY2gtb25seSB3ZWJob29rIHNlY3JldA=="  # base64 of a bench-only secret
NEVER_OPENS = 1_000_000  # breaker minimum calls for channels whose breaker must stay closed


@dataclass
class Stack:
    env: dict[str, str]
    db_url: str
    pg_server: str
    db_name: str
    server: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    base: str = ""
    worker_log: Path | None = None


def new_stack(pg_server: str, redis_url: str) -> Stack:
    """A fresh database and the environment of notify's processes (Redis mode, DEBUG off, a
    unique Redis prefix). Django is set up in this process on the same settings, so the bench
    configures channels with the ORM and reads results back with it."""
    db_name = f"notify_bench_delivery_{os.getpid()}"
    with psycopg.connect(with_db(pg_server, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db_name}"')
    db_url = with_db(pg_server, db_name)
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"bench-delivery-{os.getpid()}",
        "DEBUG": "false",
        "SECRET_KEY": "bench-only-not-secret",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "INGEST_RATE": "1000000/s",
        "HOOK_SECRET": HOOK_SECRET,
        # Health checks would mark the refused and hung SMTP providers unhealthy (connect +
        # EHLO) and the balancer would skip them: the failover phase measures the path without.
        "HEALTH_CHECK_INTERVAL_S": "3600",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "notify_project.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    return Stack(env=env, db_url=db_url, pg_server=pg_server, db_name=db_name)


def api_key() -> str:
    from routing_app.models import ApiKey

    key = ApiKey(name="bench", scopes=["ingest", "deliveries"])
    raw = key.set_new_key()
    key.save()
    return raw


def channel(name: str, kind: str, topic: str, providers: list[dict], **fields) -> None:
    """A channel of ``kind`` with ``providers`` (dicts of Provider fields) and a route from the
    topic pattern ``topic``; email routes send to one literal address. The channel's rate limit
    is far above what is sent (the limiter is still called, as in production)."""
    from routing_app.models import Channel, Provider, Route

    options = {"from_email": "notify@bench.test"} if kind == "email" else {}
    defaults = dict(rate_limit="1000000/s", retry_backoff_s=1, retry_backoff_max_s=2)
    row = Channel.objects.create(name=name, kind=kind, options=options, **{**defaults, **fields})
    for spec in providers:
        Provider.objects.create(channel=row, **spec)
    route = Route.objects.create(
        name=name, topic_pattern=topic, addresses="to@bench.test" if kind == "email" else ""
    )
    route.channels.set([row])


def _pinned(argv: list[str], core: int | None) -> list[str]:
    if core is None or not shutil.which("taskset"):
        return argv
    return ["taskset", "-c", str(core), *argv]


def start(stack: Stack, concurrency: int, server_core: int, logs: Path, threads: int) -> None:
    """uvicorn (``uvicorn_argv()``, pinned to ``server_core``) and a Celery worker
    (``celery_worker_argv()`` with ``concurrency`` pool processes and ``--beat``: the sweeper,
    not pinned; ``threads``, unless 0, as its DELIVERY_THREADS); returns once both are ready."""
    from routing_app.management.commands.serve import celery_worker_argv, uvicorn_argv

    if threads:
        stack.env["DELIVERY_THREADS"] = str(threads)

    port = free_port()
    stack.base = f"http://127.0.0.1:{port}"
    server_argv = [*uvicorn_argv("127.0.0.1", port), "--log-level", "warning"]
    with (logs / "server.log").open("ab") as out:
        stack.server = subprocess.Popen(
            _pinned(server_argv, server_core),
            cwd=ROOT,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.worker_log = logs / "worker.log"
    worker_argv = [
        *celery_worker_argv(),
        "--hostname=bench@%h",
        f"--concurrency={concurrency}",
        "--beat",
        f"--schedule={logs / 'beat-schedule'}",
    ]
    with stack.worker_log.open("ab") as out:
        stack.worker = subprocess.Popen(
            worker_argv,
            cwd=ROOT,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while " ready." not in stack.worker_log.read_text(errors="replace"):
        if stack.worker.poll() is not None or time.monotonic() > deadline:
            tail = stack.worker_log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the Celery worker did not start:\n{tail}")
        time.sleep(0.2)
    import httpx

    while True:
        try:
            httpx.get(f"{stack.base}/api/v1/openapi.json", timeout=2)
            return
        except httpx.TransportError:
            if stack.server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the notify server did not start: see server.log") from None
            time.sleep(0.2)


def stop(stack: Stack) -> None:
    for proc in (stack.worker, stack.server):
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
    from django.db import connections

    connections.close_all()
    import redis

    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    for key in client.scan_iter(match=f"{stack.env['REDIS_PREFIX']}*", count=1000):
        client.delete(key)  # the breakers', the limiter's and the broker's keys of this run
    with psycopg.connect(with_db(stack.pg_server, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{stack.db_name}" WITH (FORCE)')


# --- CPU and memory --------------------------------------------------------------------------


def _by_name(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _ticks(pids: list[int]) -> dict[tuple[int, int], int]:
    """utime + stime per (pid, start time): pids are reused quickly on a busy machine, and a
    new process under an old pid must not count as the old one's CPU going backwards."""
    ticks = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        ticks[(pid, int(fields[19]))] = int(fields[11]) + int(fields[12])
    return ticks


def _machine_busy_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


class CpuMeter:
    """CPU seconds used by process groups between ``start()`` and ``stop()``: ``groups`` maps a
    name to a root pid (the process and its descendants), a list of pids (those alone) or a
    process name (every process of that name: Postgres's backends, redis-server). The pids are
    listed again at ``stop``, so processes that ended in between are missed."""

    def __init__(self, groups: dict[str, int | str | list[int]]) -> None:
        self.groups = groups
        self.before: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.machine_pct = 0.0
        self.window_s = 0.0

    def _pids(self, what: int | str | list[int]) -> list[int]:
        if isinstance(what, list):
            return what
        if isinstance(what, str):
            return _by_name(what)
        try:
            return descendants(what)
        except FileNotFoundError:
            return []

    def _sample(self) -> dict[str, dict[tuple[int, int], int]]:
        return {name: _ticks(self._pids(what)) for name, what in self.groups.items()}

    def start(self) -> None:
        self.before = self._sample()
        self._machine = _machine_busy_ticks()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        after = self._sample()
        busy, total = _machine_busy_ticks()
        self.window_s = time.perf_counter() - self._t0
        # Per pid: a process that started in the window counts from 0, one that ended is missed.
        self.seconds = {
            k: sum(t - self.before[k].get(proc, 0) for proc, t in after[k].items()) / CLK_TCK
            for k in self.groups
        }
        spent = total - self._machine[1]
        share = (busy - self._machine[0]) / spent if spent else 0.0
        self.machine_pct = 100 * os.cpu_count() * share
        self.others_s = share * os.cpu_count() * self.window_s - sum(self.seconds.values())

    def line(self, per: int, what: str) -> str:
        """CPU per ``what`` of each group (ms and % of one core), and the machine's use."""
        parts = [
            f"{name} {1000 * s / per:.2f} ms ({100 * s / self.window_s:.0f} %)"
            for name, s in self.seconds.items()
            if per
        ]
        return (
            f"CPU per {what} (and % of one core over {self.window_s:.1f} s): "
            + ", ".join(parts)
            + f"; machine {self.machine_pct:.0f} % of {100 * os.cpu_count()} %, of which "
            f"{100 * self.others_s / self.window_s:.0f} % other processes and the kernel"
        )


def rss_mb(pid: int) -> float:
    return rss_kb(pid) / 1024


# --- the machine -----------------------------------------------------------------------------


def machine_report(pg_server: str, redis_url: str) -> list[str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    with psycopg.connect(with_db(pg_server, "postgres"), autocommit=True) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    import redis

    redis_version = redis.Redis.from_url(redis_url).info("server")["redis_version"]
    names = ("django", "celery", "kombu", "redis", "uvicorn", "psycopg", "httpx", "aiosmtpd")
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)
    mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return [
        f"CPU: {model}, {os.cpu_count()} cores, {mem_mb} MB RAM, {platform.platform()}",
        f"Python {platform.python_version()}; {versions}",
        f"PostgreSQL {pg_version} (synchronous_commit={sync}), Redis {redis_version}; "
        f"load average at start {load}",
    ]


# --- profiles --------------------------------------------------------------------------------


def start_profile(pid: int, out: Path, duration_s: int) -> subprocess.Popen:
    """py-spy on ``pid`` and its children, collapsed stacks to ``out`` (see ``summarize``)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [str(py_spy if py_spy.exists() else "py-spy"), "record", "--pid", str(pid)]
    argv += ["--subprocesses", "--format", "raw", "-o", str(out), "--rate", "100"]
    # --gil: only the thread holding the interpreter lock, i.e. where the CPU goes (threads
    # waiting on Postgres, Redis or a peer would otherwise fill the profile).
    argv += ["--duration", str(duration_s), "--nonblocking", "--gil"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(collapsed: Path, top: int = 12) -> list[str]:
    """Where a py-spy collapsed-stack file's samples went: by the project's line that was
    running (the deepest ``routing_app`` frame of each sample: which query, which call), then by
    the package of the sample's own frame (the leaf: where the CPU was)."""
    sites: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        n = int(count)
        total += n
        ours = [f for f in frames if "routing_app/" in f]
        if ours:
            name, _, where = ours[-1].partition(" (")
            sites[f"{name} ({where.rstrip(')').split('routing_app/')[-1]})"] += n
        else:
            sites[f"outside the project: {frames[-1].partition(' (')[0]}"] += n
        where = frames[-1].partition(" (")[2].split(":")[0]
        own[where.split("/")[0] if "/" in where else where] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{100 * n / total:5.1f} %  {site}" for site, n in sites.most_common(top)]
    packages = ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in own.most_common(10))
    return [*lines, f"own time by package: {packages}"]
