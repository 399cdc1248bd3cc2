"""Realtime fanout benchmark (issue 3, point 6): our edge against a bare `websockets` server.

    .venv/bin/python bench/fanout.py --wait-quiet 180   # every part, 2 runs each (~25 min)
    .venv/bin/python bench/fanout.py --quick            # smaller counts, 1 run (~4 min)
    .venv/bin/python bench/fanout.py --only ws --target bare   # the bare-server part alone
    .venv/bin/python bench/fanout.py --only latency --profile /tmp/prof   # py-spy our server

It starts everything itself: its own redis-server on a free port, a fresh Postgres database
(``notify_h7_bench`` on the server of ``--pg``), migrations, a user with a client token and an API
key, then per run a fresh server process: ours is the production ASGI server, uvicorn (uvloop,
httptools, its default websockets-sansio protocol with permessage-deflate on, ``--lifespan off``
as ``manage.py serve`` runs it, access log off), ``notify_project.asgi:application`` in Redis mode
with DEBUG off; the bare one is bench/bare_ws_server.py (websockets.broadcast on uvloop). Server
and Redis are pinned to ``--server-core``, the load generator (this process and its forked client
processes) to ``--client-core``. Postgres is the machine's shared server (not pinned).

Parts and method (each part runs ``--runs`` times; a fresh server process per run; ours and bare
alternate in the same run on the same core):
- ws: S=1,000 plain-WebSocket subscribers on one topic. Variants:
  plain / deflate: after a warm-up, N=300 notifications published as fast as possible (ours:
  POST /api/v1/notifications/batch, 3 batches of 100 sent concurrently; bare: frames on a
  /publish socket); delivered msg/s = S*N / (first publish request written -> last subscriber's
  last message). Deflate: the client offers permessage-deflate as browsers do. Caution: our hub
  hands a burst to each socket as one batch (one write per socket per batch) where
  websockets.broadcast writes once per message per socket, so the ratio ours/bare in these
  variants compares designs, not the per-message path; both are often load-generator-bound.
  paced: 25 msg/s, each message crosses the server alone (no batching possible); the server CPU
  per delivery is compared, for ours with the ingest cost taken out (the same run with 1
  subscriber is subtracted).
  Every subscriber checks every seq: in order, none missing, none twice.
- latency: 100 subscribers, 50 notifications/s open-loop, each a single POST
  /api/v1/notifications; latency = request written -> message parsed by a subscriber, both stamped
  with time.monotonic() in the same client process; p50/p95/p99 over every (message, subscriber).
  Also the ingest answer time, and (ours-bus) the same from a raw Redis PUBLISH on the hub's
  channel, i.e. without ingest, to tell the fanout path's share from ingest's.
- idle: server RSS growth per connection from 1 to 10,000 idle subscribed sockets, without and
  with permessage-deflate negotiated (RSS is user memory; kernel socket buffers are not in it),
  and how long one message takes to reach them all; then 25,000 sockets held for ``--hold``
  seconds (longer than the 30 s heartbeat by default, so app and protocol pings are answered at
  scale) after which one notification posted to one server must reach all 25,000. Sockets per
  process are capped by RLIMIT_NOFILE's hard limit (20,000 here; raising it needs
  CAP_SYS_RESOURCE): the 25,000 are then spread over as few server processes (all on the server
  core, sharing Redis: the production shape) and client processes as the limit allows. Source
  addresses 127.0.0.2-9 spread the ephemeral ports.
- sse: 500 SSE streams on /events/<topic>/, N=200 as in ws; events/s.
Per measured window it prints the CPU use of the server, Redis and the load generator, the server
CPU per delivery, per-core busy time, steal, and CPU used by anything else on the machine (other
jobs distort figures: ``--wait-quiet`` waits for a quiet machine before each run; judge a run by
its ``other_cpu_pct``). The load generator is bench/minimal_clients.py (raw asyncio on uvloop, no
JSON decoding) so that it is not the bottleneck; when its CPU nears 100 % the figure is a lower
bound for the server, and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

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
PART_NAMES = ("ws", "latency", "idle", "sse")
LIBRARIES = (
    "Django",
    "channels",
    "channels-redis",
    "uvicorn",
    "uvloop",
    "httptools",
    "websockets",
    "redis",
    "psycopg",
    "django-eventstream",
    "django-ninja",
)
AIMS = {
    "ws_msgs_per_s": 50_000,
    "ws_ratio": 0.40,
    "p50_ms": 2.3,
    "p99_ms": 10.0,
    "kb_per_idle_conn": 30.0,
    "sse_events_per_s": 30_000,
}
CLIENT_SATURATED_PCT = 90.0


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

    def start(self, target: str) -> ServerProcess:
        port = free_port()
        if target == "bare":
            argv = [sys.executable, str(BENCH_DIR / "bare_ws_server.py"), "--port", str(port)]
            return ServerProcess(
                argv, dict(os.environ), self.args.server_core, port, self.logdir, "bare"
            )
        argv = [sys.executable, "-m", "uvicorn", "notify_project.asgi:application"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        argv += ["--log-level", "warning", "--backlog", "4096", "--lifespan", "off"]
        return ServerProcess(argv, self.env, self.args.server_core, port, self.logdir, "ours")


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


# --- parts ------------------------------------------------------------------------------------


def base_cfg(svc: Services, server: ServerProcess, target: str) -> dict:
    return {
        "target": target,
        "host": "127.0.0.1",
        "port": server.port,
        "api_key": svc.api_key,
        "origin": BENCH_ORIGIN,
        "pids": {"server": server.pid, "redis": svc.redis_pid if target == "ours" else 0},
    }


def ws_path(svc: Services, target: str, topic: str) -> str:
    return "/sub" if target == "bare" else f"/ws/{topic}/?token={svc.token}"


def machine_busy_pct(sample_s: float = 2.0) -> float:
    """CPU busy on the whole machine over ``sample_s`` (100 % = one core), from /proc/stat."""
    from fanout_load import cores_busy_s

    before = cores_busy_s()["cpu"]
    time.sleep(sample_s)
    return 100 * (cores_busy_s()["cpu"] - before) / sample_s


def wait_quiet(args) -> None:
    """Other jobs share this machine: wait (up to ``--wait-quiet`` s) until they use less than
    ``--quiet-pct`` of a core, so that a run measures us and not them."""
    deadline = time.monotonic() + args.wait_quiet
    while True:
        busy = machine_busy_pct()
        if busy <= args.quiet_pct or time.monotonic() >= deadline:
            state = "quiet" if busy <= args.quiet_pct else "NOT quiet (gave up waiting)"
            print(f"    machine busy {busy:.0f} % of a core before the run: {state}")
            return


PROFILED: set[str] = set()


def one_run(svc, args, target: str, part: str, cfg_extra: dict):
    print(f"  [{time.strftime('%H:%M:%S')}] {part} {target} load avg {os.getloadavg()[0]:.2f}")
    wait_quiet(args)
    profile = None
    if args.profile and target == "ours" and part not in PROFILED:
        # Only the first run of each part: py-spy's sampling slows the server it samples.
        PROFILED.add(part)
        profile = Path(args.profile) / (part.replace("/", "-") + ".txt")
    server = svc.start(target)
    try:
        cfg = base_cfg(svc, server, target) | cfg_extra
        name = part.split("/")[0]
        name = "fanout" if name in ("ws", "sse") else name
        result = run_client(name, cfg, args.part_timeout, profile)
    finally:
        server.stop()
    if "error" in result:
        print(f"    ERROR: {json.dumps(result)}")
    else:
        print("    " + json.dumps(result))
        client = result.get("client_cpu_pct", 0)
        if client >= CLIENT_SATURATED_PCT:
            print(f"    note: load generator at {client} % CPU: this figure is a lower bound")
    return result


WS_VARIANTS = ("plain", "deflate", "paced")
PACE_PER_S = 25  # paced variant: each message crosses the server alone (40 ms apart)


def run_ws(svc, args) -> dict:
    """Saturation (a burst of batches, plain and deflate) and the paced per-message cost."""
    out: dict = {variant: [] for variant in WS_VARIANTS}
    topic = TOPICS["ws"]
    for run in range(args.runs):
        for variant in WS_VARIANTS:
            pair = {}
            targets = list(args.targets)
            if variant == "paced" and "ours" in targets:
                targets.append("ours-1sub")  # what the ingest path alone costs at that rate
            for target in targets:
                server = "ours" if target.startswith("ours") else target
                extra = {
                    "path": ws_path(svc, server, topic),
                    "topic": topic,
                    "deflate": variant == "deflate",
                    "subscribers": 1 if target == "ours-1sub" else args.ws_subscribers,
                    "messages": args.paced_messages if variant == "paced" else args.ws_messages,
                    "pace_per_s": PACE_PER_S if variant == "paced" else 0,
                    "warmup": 10,
                    "batch": 100,
                    "timeout_s": 120,
                }
                label = f"ws/{variant}" + ("/1-subscriber" if target == "ours-1sub" else "")
                pair[target] = one_run(svc, args, server, label, extra)
            ours, bare = pair.get("ours", {}), pair.get("bare", {})
            if ours.get("msgs_per_s") and bare.get("msgs_per_s") and variant != "paced":
                pair["ratio"] = round(ours["msgs_per_s"] / bare["msgs_per_s"], 3)
                print(f"    ratio ours/bare run {run + 1} {variant}: {pair['ratio']}")
            base = pair.get("ours-1sub", {})
            if ours.get("server_cpu_s") is not None and base.get("server_cpu_s") is not None:
                extra_s = ours["server_cpu_s"] - base["server_cpu_s"]
                extra_n = ours["delivered"] - base["delivered"]
                pair["ours_marginal_us_per_delivery"] = round(1e6 * extra_s / max(extra_n, 1), 2)
                print(
                    "    ours: server CPU per extra delivery, ingest cost taken out: "
                    f"{pair['ours_marginal_us_per_delivery']} us"
                )
            out[variant].append(pair)
    return out


def run_latency(svc, args) -> dict:
    """Ingest POST -> subscriber, ours and bare; and ours from Redis PUBLISH on (no ingest)."""
    out: dict = {"runs": []}
    for _ in range(args.runs):
        pair = {}
        for target in [*args.targets, "ours-bus"] if "ours" in args.targets else args.targets:
            bus = target == "ours-bus"
            server = "ours" if bus else target
            topic = TOPICS["bus" if bus else "latency"]
            extra = {
                "path": ws_path(svc, server, topic),
                "topic": topic,
                "bus": bus,
                "redis_addr": svc.redis_addr,
                "redis_prefix": BENCH_PREFIX,
                "subscribers": 100,
                "rate": 50,
                "messages": args.latency_messages,
                "warmup": 20,
                "timeout_s": 30,
            }
            label = "latency/redis-publish-to-client" if bus else "latency"
            pair[target] = one_run(svc, args, server, label, extra)
        out["runs"].append(pair)
    return out


def run_idle(svc, args) -> dict:
    """Memory per idle socket without and with permessage-deflate (browsers offer it, and the
    server then keeps a compressor and a decompressor per socket), then the 25,000 hold."""
    out: dict = {"memory": [], "memory_deflate": [], "hold": []}
    topic = TOPICS["idle"]
    for _ in range(args.runs):
        for key, deflate in (("memory", False), ("memory_deflate", True)):
            pair = {}
            for target in args.targets:
                extra = {
                    "path": ws_path(svc, target, topic),
                    "topic": topic,
                    "first": args.idle_first,
                    "settle_s": 2.0,
                    "deflate": deflate,
                }
                label = "idle_memory" + ("/deflate" if deflate else "")
                pair[target] = one_run(svc, args, target, label, extra)
            out[key].append(pair)
        if "ours" in args.targets and not args.no_hold:
            out["hold"].append({"ours": idle_hold(svc, args, topic)})
    return out


def ingest_one(port: int, api_key: str, topic: str) -> tuple[int, float]:
    """POST one notification from the orchestrator; returns (seq, monotonic time sent)."""
    body = json.dumps({"topic": topic, "event": "bench.hold", "data": {"held": True}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/notifications",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    sent = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310  (our own server)
        return json.loads(response.read())["seq"], sent


def idle_hold(svc, args, topic: str) -> dict:
    """Hold ``idle_total`` connections across as few server and client processes as the fd hard
    limit allows (all servers on the server core, sharing Redis), then publish once to all."""
    total = args.idle_total
    per_process = sockets_per_process()
    n = max(1, -(-total // per_process))
    print(
        f"  [{time.strftime('%H:%M:%S')}] idle_hold ours: {total} connections over {n} server and "
        f"{n} client process(es) (fd hard limit {per_process + FD_MARGIN}); "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    wait_quiet(args)
    servers = [svc.start("ours") for _ in range(n)]
    clients: list[ClientProcess] = []
    try:
        cfg = base_cfg(svc, servers[0], "ours") | {
            "ports": [srv.port for srv in servers],
            "path": ws_path(svc, "ours", topic),
            "topic": topic,
            "timeout_s": 60,
        }
        bounds = [round(i * total / n) for i in range(n + 1)]
        for i in range(n):
            clients.append(ClientProcess("idle_hold", cfg | {"range": (bounds[i], bounds[i + 1])}))
        t = time.monotonic()
        reports = [c.recv(args.part_timeout) for c in clients]
        connect_s = time.monotonic() - t
        if any(kind == "result" for kind, _ in reports):
            return {"error": [p for kind, p in reports if kind == "result"]}
        opened = sum(p["opened"] for _, p in reports)
        print(f"    {opened} connected in {connect_s:.1f} s; holding {args.hold:.0f} s")
        for c in clients:
            c.send("hold")
        time.sleep(args.hold)
        rss_mb = [round(proc_rss_mb(srv.pid), 1) for srv in servers]
        armed = [c.recv(60) for c in clients]
        seq, sent = ingest_one(servers[0].port, svc.api_key, topic)
        for c in clients:
            c.send(seq)
        results = [c.recv(120)[1] for c in clients]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            return {"error": errors}
        reached = sum(r["reached"] for r in results)
        closed = sum(p["closed_in_hold"] for _, p in armed)
        result = {
            "servers": n,
            "opened": opened,
            "connect_failed": sum(r["connect_failed"] for r in results),
            "connect_errors": [e for r in results for e in r["connect_errors"]][:3],
            "connect_s": round(connect_s, 1),
            "hold_s": args.hold,
            "closed_in_hold": closed,
            "close_codes": sorted({code for r in results for code in r["close_codes"]}),
            "server_rss_mb": rss_mb,
            "reached_by_publish": reached,
            "publish_to_first_s": round(min(r["t_first"] for r in results) - sent, 3),
            "publish_to_last_s": round(max(r["t_last"] for r in results) - sent, 3),
            "held": opened == total and closed == 0 and reached == total,
        }
        print("    " + json.dumps(result))
        return result
    finally:
        for c in clients:
            c.stop()
        for srv in servers:
            srv.stop()


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_sse(svc, args) -> dict:
    out: dict = {"runs": []}
    topic = TOPICS["sse"]
    if "ours" not in args.targets:
        return out
    for _ in range(args.runs):
        extra = {
            "path": f"/events/{topic}/?token={svc.token}",
            "topic": topic,
            "sse": True,
            "subscribers": args.sse_subscribers,
            "messages": args.sse_messages,
            "warmup": 1,
            "batch": 100,
            "timeout_s": 120,
        }
        out["runs"].append({"ours": one_run(svc, args, "ours", "sse", extra)})
    return out


RUNNERS = {"ws": run_ws, "latency": run_latency, "idle": run_idle, "sse": run_sse}


# --- report -----------------------------------------------------------------------------------


def machine_info(args) -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libs[name] = "absent"
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": libs,
        "redis_server": redis_v.split()[2] if redis_v else "?",
        "server_core": args.server_core,
        "client_core": args.client_core,
        "load_avg_at_start": os.getloadavg(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_files": len(git("status", "--short", "--untracked-files=no").splitlines()),
    }


def git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def _values(runs: list[dict], target: str, key: str) -> list:
    return [r[target][key] for r in runs if r.get(target, {}).get(key) is not None]


def _fmt(values: list, unit: str = "") -> str:
    if not values:
        return "n/a"
    shown = ", ".join(f"{v:,}" if isinstance(v, int) else f"{v}" for v in values)
    med = statistics.median(values)
    return f"{shown}{unit} (median {med:,.3g}{unit})" if len(values) > 1 else f"{shown}{unit}"


def _check(label: str, values: list, aim: float, higher_is_better: bool) -> str:
    if not values:
        return f"  {label}: not measured"
    med = statistics.median(values)
    ok = med >= aim if higher_is_better else med <= aim
    op = ">=" if higher_is_better else "<="
    return f"  {label}: median {med:,.4g} vs aim {op} {aim:,} -> {'MET' if ok else 'NOT MET'}"


def summarize(results: dict) -> None:
    print("\n=== summary (each value is one run) ===")
    checks = []
    if "ws" in results:
        for variant in WS_VARIANTS:
            runs = results["ws"][variant]
            ours = _values(runs, "ours", "msgs_per_s")
            bare = _values(runs, "bare", "msgs_per_s")
            ratios = [r["ratio"] for r in runs if "ratio" in r]
            print(f"ws {variant:7s} delivered msg/s  ours: {_fmt(ours)}")
            print(f"ws {variant:7s} delivered msg/s  bare: {_fmt(bare)}")
            print(f"ws {variant:7s} ratio ours/bare: {_fmt(ratios)}")
            print(
                f"ws {variant:7s} client CPU % ours: "
                f"{_fmt(_values(runs, 'ours', 'client_cpu_pct'))}"
                f"  bare: {_fmt(_values(runs, 'bare', 'client_cpu_pct'))}"
            )
            print(
                f"ws {variant:7s} server us per delivery ours: "
                f"{_fmt(_values(runs, 'ours', 'server_us_per_delivery'))}"
                f"  bare: {_fmt(_values(runs, 'bare', 'server_us_per_delivery'))}"
            )
            if variant == "paced":
                marginal = [
                    r["ours_marginal_us_per_delivery"]
                    for r in runs
                    if "ours_marginal_us_per_delivery" in r
                ]
                print(
                    f"ws paced   ours marginal us per delivery (ingest taken out): {_fmt(marginal)}"
                )
            print(
                f"ws {variant:7s} server CPU % ours: "
                f"{_fmt(_values(runs, 'ours', 'server_cpu_pct'))}"
                f"  bare: {_fmt(_values(runs, 'bare', 'server_cpu_pct'))}"
            )
            if variant == "plain":
                checks.append(_check("ws msg/s (plain)", ours, AIMS["ws_msgs_per_s"], True))
                checks.append(_check("ws ratio to bare (plain)", ratios, AIMS["ws_ratio"], True))
    if "latency" in results:
        runs = results["latency"]["runs"]
        for target in ("ours", "ours-bus", "bare"):
            for key in ("p50_ms", "p95_ms", "p99_ms", "answer_p50_ms"):
                vals = _values(runs, target, key)
                if vals:
                    print(f"latency {target} {key}: {_fmt(vals, ' ms')}")
        checks.append(
            _check("latency p50 ms", _values(runs, "ours", "p50_ms"), AIMS["p50_ms"], False)
        )
        checks.append(
            _check("latency p99 ms", _values(runs, "ours", "p99_ms"), AIMS["p99_ms"], False)
        )
    if "idle" in results:
        runs = results["idle"]["memory"]
        for key in ("memory", "memory_deflate"):
            for target in ("ours", "bare"):
                vals = _values(results["idle"][key], target, "kb_per_idle_conn")
                if vals:
                    label = "with permessage-deflate" if key == "memory_deflate" else "plain"
                    print(f"idle {target} KB per idle connection ({label}): {_fmt(vals)}")
        held = _values(results["idle"]["hold"], "ours", "held")
        print(f"idle ours 25,000 held: {held}")
        checks.append(
            _check(
                "KB per idle conn",
                _values(runs, "ours", "kb_per_idle_conn"),
                AIMS["kb_per_idle_conn"],
                False,
            )
        )
        checks.append(f"  25,000 held: {held} -> {'MET' if held and all(held) else 'NOT MET'}")
    if "sse" in results:
        runs = results["sse"]["runs"]
        vals = _values(runs, "ours", "msgs_per_s")
        print(
            f"sse ours delivered events/s: {_fmt(vals)}; "
            f"client CPU %: {_fmt(_values(runs, 'ours', 'client_cpu_pct'))}"
        )
        checks.append(_check("SSE events/s", vals, AIMS["sse_events_per_s"], True))
    print("aims:")
    for line in checks:
        print(line)


def serve_for_experiments(svc: Services) -> None:
    """--serve: our server as the bench runs it, until Ctrl-C (for profiling by hand)."""
    server = svc.start("ours")
    info = {"port": server.port, "pid": server.pid, "api_key": svc.api_key, "token": svc.token}
    print(json.dumps(info), flush=True)
    # Background shells ignore SIGINT: SIGTERM stops it too, cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Realtime fanout benchmark (see module docstring).", allow_abbrev=False
    )
    parser.add_argument(
        "--only", action="append", choices=PART_NAMES, help="run only this part (repeatable)"
    )
    parser.add_argument("--target", choices=("both", "ours", "bare"), default="both")
    parser.add_argument("--quick", action="store_true", help="smaller counts and one run")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per part (default 2; 1 with --quick)"
    )
    parser.add_argument(
        "--pg", default="postgres://postgres@127.0.0.1:5432", help="Postgres server URL"
    )
    parser.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--hold", type=float, default=None, help="idle hold seconds at 25,000")
    parser.add_argument("--no-hold", action="store_true", help="idle: memory only, no 25,000 hold")
    parser.add_argument(
        "--profile", default="", help="directory: py-spy records our server in each part's run 1"
    )
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument(
        "--serve", action="store_true", help="only start our server, print its port"
    )
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="wait up to this many s for a quiet machine"
    )
    parser.add_argument(
        "--quiet-pct", type=float, default=15.0, help="quiet = others use less than this %% CPU"
    )
    args = parser.parse_args(argv)
    args.parts = args.only or list(PART_NAMES)
    args.targets = ["bare", "ours"] if args.target == "both" else [args.target]
    q = args.quick
    args.runs = args.runs or (1 if q else 2)
    args.ws_subscribers = 1000
    args.ws_messages = 100 if q else 300
    args.paced_messages = 50 if q else 150
    args.latency_messages = 100 if q else 500
    args.idle_first = 2000 if q else 10_000
    args.idle_total = 5000 if q else 25_000
    args.hold = args.hold if args.hold is not None else (5.0 if q else 35.0)
    args.sse_subscribers = 500
    args.sse_messages = 60 if q else 200
    args.part_timeout = 600
    return args


def use_project_venv() -> None:
    """Re-run under the project's .venv when started with another Python (it needs uvicorn,
    websockets, psycopg... and the servers it starts use the same interpreter)."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        os.execv(str(venv_python), [str(venv_python), *sys.argv])  # noqa: S606  (our own argv)


def main(argv=None) -> None:
    use_project_venv()
    args = parse_args(argv)
    os.sched_setaffinity(0, {args.client_core})
    raise_nofile()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    info = machine_info(args)
    print(__doc__)
    print("=== machine ===")
    print(json.dumps(info, indent=1))
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    results: dict = {"machine": info}
    with (
        tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp,
        Services(args, Path(tmp)) as svc,
    ):
        if args.serve:
            serve_for_experiments(svc)
            return
        for part in args.parts:
            print(f"\n=== {part} ===")
            results[part] = RUNNERS[part](svc, args)
        summarize(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
