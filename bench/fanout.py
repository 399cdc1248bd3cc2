"""Realtime fanout benchmark: our edge against a bare `websockets` server.

    .venv/bin/python bench/fanout.py --wait-quiet 180   # every part, 2 runs each (~25 min)
    .venv/bin/python bench/fanout.py --quick            # smaller counts, 1 run (~4 min)
    .venv/bin/python bench/fanout.py --only ws --target bare   # the bare-server part alone
    .venv/bin/python bench/fanout.py --only latency --profile /tmp/prof   # py-spy our server

It starts everything itself: its own redis-server on a free port, a fresh Postgres database
(``notify_h7_bench`` on the server of ``--pg``), migrations, a user with a client token and an API
key, then per run a fresh server process: ours is the production ASGI server, uvicorn with
``manage.py serve``'s command line (bench/served.py: uvloop, its bounded httptools protocol,
websockets-sansio with permessage-deflate on, ``--lifespan off``; access log off), in Redis mode
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
  and how long one message takes to reach them all; then ``--hold-total`` sockets (25,000 by
  default) held for ``--hold`` seconds (longer than the 30 s heartbeat by default, so app and
  protocol pings are answered at scale) after which one notification posted to one server must
  reach them all. Sockets per process are capped by RLIMIT_NOFILE's hard limit (20,000 here;
  raising it needs CAP_SYS_RESOURCE): they are spread over as few client processes as the limit
  allows, and over as many server processes (all on the server core, sharing Redis) or, with
  ``--hold-workers N``, one server of N uvicorn workers on one port, as ``manage.py serve
  --workers N`` runs (the kernel hands each accepted socket to one of them). Source addresses
  127.0.0.2-9 spread the ephemeral ports. The 50,000 aim:
  ``--only idle --no-memory --hold-total 50000 --hold-workers 4 --hold 600``.
- sse: 500 SSE streams on /events/<topic>/, N=200 as in ws; events/s. The limit: the bare
  server's SSE listener (bare_ws_server.py --sse-port), which writes each message to each stream
  as its own chunk; our edge writes a burst as one chunk per stream (the same caution as in ws:
  the ratio compares designs).
- metrics: with ``--metrics both`` (the default) the ws plain/deflate, latency and sse parts also
  run our server with ``METRICS_ENABLED=false`` in the same run and print on/off ratios of
  throughput, server CPU per delivery and latency: what recording metrics costs.
Per measured window it prints the CPU use of the server, Redis and the load generator, the server
CPU per delivery, per-core busy time, steal, and CPU used by anything else on the machine (other
jobs distort figures: ``--wait-quiet`` waits for a quiet machine before each run; judge a run by
its ``other_cpu_pct``). The load generator is bench/minimal_clients.py (raw asyncio on uvloop, no
JSON decoding) so that it is not the bottleneck; when its CPU nears 100 % the figure is a lower
bound for the server, and the output says so.

Code: this file (parts, options), fanout_processes.py (services, server and client processes,
py-spy), fanout_load.py (what each client process does), minimal_clients.py (the cheap clients),
fanout_report.py (machine and summary), bare_ws_server.py (the limit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout_processes import (  # noqa: E402  (bench/ is not a package)
    BENCH_ORIGIN,
    BENCH_PREFIX,
    FD_MARGIN,
    ROOT,
    TOPICS,
    ClientProcess,
    ServerProcess,
    Services,
    raise_nofile,
    run_client,
    sockets_per_process,
)
from fanout_report import machine_info, summarize  # noqa: E402

PART_NAMES = ("ws", "latency", "idle", "sse")
CLIENT_SATURATED_PCT = 90.0


# --- parts ------------------------------------------------------------------------------------


def base_cfg(svc: Services, server: ServerProcess, target: str) -> dict:
    return {
        "target": target,
        "host": "127.0.0.1",
        "port": server.port,
        "sse_port": server.sse_port,
        "api_key": svc.api_key,
        "origin": BENCH_ORIGIN,
        "pids": {"server": server.pid, "redis": svc.redis_pid if target != "bare" else 0},
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


METRICS_OFF = "ours-metrics-off"  # our server with METRICS_ENABLED=false (Services.start)
SUFFIX = {"ours-1sub": "/1-subscriber", METRICS_OFF: "/metrics-off"}


def metrics_ratio(pair: dict, what: str, *keys: str) -> None:
    """What recording metrics costs: ours (metrics on) against the same part with them off."""
    on, off = pair.get("ours", {}), pair.get(METRICS_OFF, {})
    for key in keys or ("msgs_per_s", "server_us_per_delivery"):
        if on.get(key) and off.get(key):
            pair[f"metrics_on_off_{key}"] = ratio = round(on[key] / off[key], 3)
            print(f"    metrics on/off {what} {key}: {ratio}")


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
            elif args.metrics_off:
                targets.append(METRICS_OFF)
            for target in targets:
                server = "ours" if target == "ours-1sub" else target
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
                label = f"ws/{variant}" + SUFFIX.get(target, "")
                pair[target] = one_run(svc, args, server, label, extra)
            ours, bare = pair.get("ours", {}), pair.get("bare", {})
            if ours.get("msgs_per_s") and bare.get("msgs_per_s") and variant != "paced":
                pair["ratio"] = round(ours["msgs_per_s"] / bare["msgs_per_s"], 3)
                print(f"    ratio ours/bare run {run + 1} {variant}: {pair['ratio']}")
            metrics_ratio(pair, f"run {run + 1} ws {variant}")
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
        targets = list(args.targets)
        if "ours" in targets:
            targets += ["ours-bus", METRICS_OFF] if args.metrics_off else ["ours-bus"]
        for target in targets:
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
            label = "latency/redis-publish-to-client" if bus else "latency" + SUFFIX.get(target, "")
            pair[target] = one_run(svc, args, server, label, extra)
        metrics_ratio(pair, "latency", "p50_ms", "p99_ms")
        out["runs"].append(pair)
    return out


def run_idle(svc, args) -> dict:
    """Memory per idle socket without and with permessage-deflate (browsers offer it, and the
    server then keeps a compressor and a decompressor per socket), then the 25,000 hold."""
    out: dict = {"memory": [], "memory_deflate": [], "hold": []}
    topic = TOPICS["idle"]
    for _ in range(args.runs):
        for key, deflate in () if args.no_memory else (("memory", False), ("memory_deflate", True)):
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
    """Hold ``hold_total`` connections across as few client processes as the fd hard limit
    allows, on as few server processes (all on the server core, sharing Redis) or, with
    ``--hold-workers N``, on one server of N uvicorn workers sharing its port, as a user runs
    ``manage.py serve --workers N``; then publish once to all."""
    total = args.hold_total
    per_process = sockets_per_process()
    n = max(1, -(-total // per_process))
    shape = (
        f"one server of {args.hold_workers} workers"
        if args.hold_workers
        else f"{n} server process(es)"
    )
    print(
        f"  [{time.strftime('%H:%M:%S')}] idle_hold ours: {total} connections over {shape} and "
        f"{n} client process(es) (fd hard limit {per_process + FD_MARGIN}); "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    wait_quiet(args)
    if args.hold_workers:
        servers = [svc.start("ours", workers=args.hold_workers)]
    else:
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
        rss_mb = [round(tree_rss_mb(srv.pid), 1) for srv in servers]
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
            "servers": len(servers),
            "workers": args.hold_workers or 1,
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


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants (a multi-worker server's supervisor and workers)."""
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += proc_rss_mb(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            try:
                frontier += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return total


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_sse(svc, args) -> dict:
    out: dict = {"runs": []}
    topic = TOPICS["sse"]
    for run in range(args.runs):
        pair = {}
        for target in args.targets:
            extra = {
                "path": "/events/" if target == "bare" else f"/events/{topic}/?token={svc.token}",
                "topic": topic,
                "sse": True,
                "subscribers": args.sse_subscribers,
                "messages": args.sse_messages,
                "warmup": 1,
                "batch": 100,
                "timeout_s": 120,
            }
            pair[target] = one_run(svc, args, target, "sse", extra)
        ours, bare = pair.get("ours", {}), pair.get("bare", {})
        if ours.get("msgs_per_s") and bare.get("msgs_per_s"):
            pair["ratio"] = round(ours["msgs_per_s"] / bare["msgs_per_s"], 3)
            print(f"    ratio ours/bare run {run + 1} sse: {pair['ratio']}")
        if args.metrics_off:
            pair[METRICS_OFF] = one_run(svc, args, METRICS_OFF, "sse" + SUFFIX[METRICS_OFF], extra)
            metrics_ratio(pair, "sse")
        out["runs"].append(pair)
    return out


RUNNERS = {"ws": run_ws, "latency": run_latency, "idle": run_idle, "sse": run_sse}


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
        "--metrics",
        choices=("on", "both"),
        default="both",
        help="both: ws, latency and sse also run our server with metrics recording off",
    )
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
    parser.add_argument("--no-memory", action="store_true", help="idle: the hold only")
    parser.add_argument(
        "--hold-total", type=int, default=None, help="idle hold connections (default 25,000)"
    )
    parser.add_argument(
        "--hold-workers", type=int, default=0, help="idle hold on one server of N uvicorn workers"
    )
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
    args.metrics_off = args.metrics == "both" and "ours" in args.targets
    q = args.quick
    args.runs = args.runs or (1 if q else 2)
    args.ws_subscribers = 1000
    args.ws_messages = 100 if q else 300
    args.paced_messages = 50 if q else 150
    args.latency_messages = 100 if q else 500
    args.idle_first = 2000 if q else 10_000
    args.hold_total = args.hold_total or (5000 if q else 25_000)
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
