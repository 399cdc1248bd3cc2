"""Processes of bench/fanout.py: the services it starts (its own redis-server, a fresh Postgres
database, the server under test pinned to a core) and the forked load-generator processes that
run bench/fanout_load.py, with py-spy attached on request."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.parse
from pathlib import Path

from served import served_argv

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

FD_MARGIN = 1000  # fds a process needs besides its sockets (Postgres, Redis, files, pipes)
BENCH_DB = "notify_h7_bench"
BENCH_PREFIX = "h7bench"
BENCH_ORIGIN = "http://bench.invalid"
TOPICS = {
    "ws": "bench.fanout",
    "latency": "bench.latency",
    "bus": "bench.bus",
    "idle": "bench.idle",
    "sse": "bench.sse",
}


# --- processes --------------------------------------------------------------------------------


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one; returns the limit. (Raising the hard limit needs
    CAP_SYS_RESOURCE, which containers often lack: then 25,000 sockets need several processes.)"""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def sockets_per_process() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1] - FD_MARGIN


def pinned(core: int):
    def preexec() -> None:
        os.sched_setaffinity(0, {core})
        raise_nofile()

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout_s} s")


class ServerProcess:
    """One server under test, pinned to the server core, stopped with SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], env: dict, core: int, port: int, logdir: Path, name: str):
        self.port = port
        self.sse_port = port  # the bare server streams SSE on a port of its own
        self.log = logdir / f"{name}-{port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=pinned(core),
            )
        wait_port(port, self.proc, 60, self.log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Services:
    """Own redis-server, fresh Postgres database, migrations, bench user, API key and token."""

    def __init__(self, args, logdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        self.redis: subprocess.Popen | None = None
        self.redis_pid = 0
        self.redis_addr: tuple[str, int] = ("127.0.0.1", 6379)
        self.env: dict[str, str] = {}
        self.api_key = ""
        self.token = ""

    def __enter__(self) -> Services:
        args = self.args
        if "ours" not in args.targets:
            return self  # the bare server needs neither Redis nor Postgres
        if args.redis_url:
            redis_url = args.redis_url
        else:
            port = free_port()
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(self.logdir)]
            log = open(self.logdir / "redis.log", "wb")  # noqa: SIM115  (lives as long as redis)
            self.redis = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pinned(args.server_core)
            )
            wait_port(port, self.redis, 20, self.logdir / "redis.log")
            self.redis_pid = self.redis.pid
            redis_url = f"redis://127.0.0.1:{port}/0"
        parsed = urllib.parse.urlparse(redis_url)
        self.redis_addr = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        try:
            self._prepare(redis_url)
        except BaseException:
            self.__exit__()  # __exit__ is not called when __enter__ raises: stop our redis
            raise
        return self

    def _prepare(self, redis_url: str) -> None:
        db_url = self._fresh_database()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
        env.update(
            DATABASE_URL=db_url,
            REDIS_URL=redis_url,
            REDIS_PREFIX=BENCH_PREFIX,
            DEBUG="false",
            SECRET_KEY=secrets.token_urlsafe(50),
            ALLOWED_HOSTS="127.0.0.1,localhost",
            NOTIFY_ALLOWED_ORIGINS=BENCH_ORIGIN,
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        env.pop("CI", None)
        self.env = env
        self._setup()

    def _fresh_database(self) -> str:
        import psycopg

        base = self.args.pg.rstrip("/")
        # --serve gets its own database: a bench run meanwhile recreates the bench's.
        name = BENCH_DB + ("_serve" if self.args.serve else "")
        with psycopg.connect(base + "/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        return f"{base}/{name}"

    def _setup(self) -> None:
        py = sys.executable
        subprocess.run(
            [py, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=self.env, check=True
        )
        code = f"""
import json
from django.contrib.auth import get_user_model
from channels_app.tokens import mint
from routing_app.models import ApiKey, Topic
user, _ = get_user_model().objects.get_or_create(username="bench")
key = ApiKey(name="bench", scopes=["ingest", "tokens"])
raw = key.set_new_key()
key.save()
for name in {list(TOPICS.values())!r}:
    Topic.objects.get_or_create(name=name)
print("BENCH_SETUP " + json.dumps({{"key": raw, "token": mint(user.pk, 24 * 3600).token}}))
"""
        out = subprocess.run(
            [py, "manage.py", "shell", "-c", code],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith("BENCH_SETUP "))
        data = json.loads(line.split(" ", 1)[1])
        self.api_key, self.token = data["key"], data["token"]

    def __exit__(self, *exc) -> None:
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)

    def start(self, target: str, workers: int = 1) -> ServerProcess:
        """A fresh server: ``bare``, or ours (``workers`` uvicorn worker processes on one port,
        as ``manage.py serve --workers`` runs them)."""
        port = free_port()
        if target == "bare":
            sse_port = free_port()
            argv = [sys.executable, str(BENCH_DIR / "bare_ws_server.py"), "--port", str(port)]
            argv += ["--sse-port", str(sse_port)]
            server = ServerProcess(
                argv, dict(os.environ), self.args.server_core, port, self.logdir, "bare"
            )
            server.sse_port = sse_port
            wait_port(sse_port, server.proc, 60, server.log)
            return server
        env = self.env
        argv = [*served_argv(env, port, workers), "--log-level", "warning", "--backlog", "4096"]
        if target == "ours-metrics-off":
            env = {**env, "METRICS_ENABLED": "false"}
        return ServerProcess(argv, env, self.args.server_core, port, self.logdir, target)


# --- client processes -------------------------------------------------------------------------


def _client_entry(part: str, cfg: dict, conn) -> None:
    """Runs in the forked client process (inherits the client-core affinity)."""
    import asyncio

    import fanout_load

    raise_nofile()

    async def ctl(kind: str, data=None):
        conn.send((kind, data))
        # Wait in a thread: the loop must keep answering pings while the orchestrator holds.
        return await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    try:
        try:
            import uvloop

            result = uvloop.run(fanout_load.PARTS[part](cfg, ctl))
        except ImportError:
            result = asyncio.run(fanout_load.PARTS[part](cfg, ctl))
        conn.send(("result", result))
    except BaseException:  # noqa: BLE001  (reported to the orchestrator, which prints it)
        conn.send(("result", {"error": traceback.format_exc()}))


class ClientProcess:
    """A forked load-generator process running one part of bench/fanout_load.py."""

    def __init__(self, part: str, cfg: dict) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_client_entry, args=(part, cfg, child), daemon=True)
        self.proc.start()

    def recv(self, timeout_s: float) -> tuple[str, object]:
        if not self.conn.poll(max(timeout_s, 0)):
            return "result", {"error": f"client gave no answer within {timeout_s:.0f} s"}
        return self.conn.recv()

    def send(self, answer) -> None:
        self.conn.send(answer)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


def run_client(part: str, cfg: dict, timeout_s: float, profile: Path | None = None) -> dict:
    """Run one client process to its result; starts py-spy when it reports "measure"."""
    client = ClientProcess(part, cfg)
    spy: subprocess.Popen | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            kind, payload = client.recv(deadline - time.monotonic())
            if kind == "result":
                return payload
            if kind == "measure" and profile is not None and spy is None:
                spy = start_profiler(cfg["pids"]["server"], profile)
            client.send("go")
    finally:
        if spy is not None:
            stop_profiler(spy, profile)
        client.stop()


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    argv += ["--output", str(out), "--nonblocking", "--threads"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # py-spy attaches asynchronously; the window must not start before it samples
    return proc


def stop_profiler(proc: subprocess.Popen, out: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(f"    profile (collapsed stacks): {out}")
    print_profile_top(out)


def print_profile_top(path: Path, top: int = 25) -> None:
    """Self and inclusive sample share per function from py-spy's collapsed-stack output."""
    if not path.exists():
        print("    (py-spy wrote nothing)")
        return
    self_count: dict[str, int] = {}
    incl_count: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread", "process")):
            frames = frames[1:]
        leaf = frames[-1] if frames else "?"
        self_count[leaf] = self_count.get(leaf, 0) + n
        for frame in set(frames):
            incl_count[frame] = incl_count.get(frame, 0) + n
    if not total:
        return
    print(f"    {total} samples; top self time:")
    for name, n in sorted(self_count.items(), key=lambda kv: -kv[1])[:top]:
        print(f"      {100 * n / total:5.1f} %  {name}")
    print("    top inclusive time:")
    for name, n in sorted(incl_count.items(), key=lambda kv: -kv[1])[:top]:
        print(f"      {100 * n / total:5.1f} %  {name}")
