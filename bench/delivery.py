"""Outbound delivery benchmark: emails/s and webhooks/s through notify, against a bare sender.

    .venv/bin/python bench/delivery.py            # ~3 min
    .venv/bin/python bench/delivery.py --quick    # smaller counts, under 3 min
    .venv/bin/python bench/delivery.py --profile  # also py-spy the worker in phases 2 and 3
    .venv/bin/python bench/delivery.py --wait-quiet 120 --quiet-pct 60  # before each phase

Starts everything itself: a fresh Postgres database (on the server of BENCH_PG_URL, default
postgres://postgres@127.0.0.1:5432/), migrations, an API key (scopes ingest, deliveries), notify's
server (uvicorn, ``uvicorn_argv()``, pinned to ``--server-core``) and a Celery worker
(``celery_worker_argv()``, ``--concurrency`` pool processes, ``--beat`` for the sweeper; not
pinned) on Redis (REDIS_URL, default redis://127.0.0.1:6379/0, a prefix of its own), and the
peers (bench/delivery_peers.py: an aiosmtpd SMTP server, an asyncio webhook receiver, a server
that never answers), each a process of its own and not pinned. This load generator pins itself to
``--client-core``. Postgres and Redis are the machine's (not pinned).

Phases:
1. bare sender, the limit: the messages notify sent in the warm-up (the same bytes, the same
   headers), sent to the same peers by a plain asyncio loop in a process of its own, the protocol
   spoken over asyncio streams on kept connections (SMTP for emails, HTTP/1.1 for webhooks):
   the targets' 100 %. For reference beside them: smtplib in threads, httpx.AsyncClient, and
   httpx.Client in threads (what notify's webhook transport does).
2, 3. emails, webhooks through notify: N notifications posted in batches of ``--batch-size``
   (POST /api/v1/notifications/batch) on a topic routed to a channel with one provider;
   throughput = (N - 1) / (first to last arrival at the peer); latency = ``Delivery.latency_ms``
   (notification stored -> provider accepted) and post -> arrival at the peer. The burst queues
   everything at once, so its latencies are mostly queueing; a paced run of single posts
   (``--paced-rate``, 25/s) follows, whose latencies are the path's.
4. failover: provider A (weight 100, picked first) refusing connections, or accepting and never
   answering (call timeout 200 ms), provider B the peer: post -> B's arrival, one notification at
   a time, against the same with B alone; and error detection: with A refusing and breaker
   minimum calls 20, the calls and the time from A's first failure to ``breaker.opened``.
5. CPU per delivery of the worker, the server, Postgres, Redis, the peer and this generator,
   and the worker's and server's RSS.

Health checks are off (their interval is an hour): they would mark the refused and hung SMTP
providers unhealthy and the balancer would skip them. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from delivery_failover import (  # noqa: E402
    HUNG_TIMEOUT_MS,
    detection_phase,
    failover_phase,
    verdict,
)
from delivery_load import post_burst, post_paced, rate_of, rows_of, spread, wait_received  # noqa: E402
from delivery_peers import (  # noqa: E402  (bench/ is not a package)
    Peer,
    bare_http_httpx,
    bare_http_httpx_threads,
    bare_http_raw,
    bare_smtp_asyncio,
    bare_smtp_threads,
    run_in_process,
)
from delivery_stack import (  # noqa: E402
    NEVER_OPENS,
    CpuMeter,
    api_key,
    channel,
    machine_report,
    new_stack,
    rss_mb,
    start,
    start_profile,
    stop,
    summarize,
)
from ingest import free_port  # noqa: E402

TARGETS = {"email": 300.0, "webhook": 1000.0}  # deliveries/s on this 2-core machine
TARGET_SHARE = 30.0  # % of the bare sender
BARE_SMTP_CONNECTIONS = 8
BARE_HTTP_CONNECTIONS = 32  # as many as a worker of 2 processes x DELIVERY_THREADS 16 calls


# The bare sender of each kind, the target's 100 %: a plain asyncio loop speaking the protocol
# minimally over asyncio streams, sending the same messages to the same peers over kept
# connections: the limit of this machine. Email: EHLO once, then MAIL, RCPT, DATA per message, no
# pipelining (what smtplib does). Webhook: HTTP/1.1 keep-alive POSTs. The library clients are
# shown beside them for reference: smtplib in threads; httpx.AsyncClient (the library of
# notify's transport, async) and httpx.Client in threads (what the transport does).
BARE = {"email": "asyncio SMTP client", "webhook": "asyncio HTTP/1.1 client"}
# httpx.AsyncClient's pool costs ~3x the CPU per request from 16 concurrent requests up (1.8 ms
# with 1 to 8 connections, 5.0-5.7 ms with 16 or 32, measured here): it gets its best count.
BARE_HTTPX_CONNECTIONS = 8


def bare_phase(kind: str, peer: Peer, sample: bytes, n: int) -> tuple[dict[str, float], list]:
    """Each bare variant of ``kind``; returns the rate of each (by name) and the lines to print.
    The variant whose name starts with ``BARE[kind]`` is the bare sender of the target; ``n``
    messages each, ten times that for the raw HTTP client (``n`` would last a few ms)."""
    raw_n = 10 * n  # the raw client is so fast that n would last a few ms only
    if kind == "email":
        smtp = BARE_SMTP_CONNECTIONS
        variants = [
            (f"asyncio SMTP client, {smtp} connections", bare_smtp_asyncio, peer.port, smtp, n),
            (f"smtplib, {smtp} threads", bare_smtp_threads, peer.port, smtp, n),
        ]
    else:
        url = f"http://127.0.0.1:{peer.port}/hook"
        http = BARE_HTTP_CONNECTIONS
        variants = [
            (
                f"httpx.AsyncClient, {BARE_HTTPX_CONNECTIONS} connections",
                bare_http_httpx,
                url,
                BARE_HTTPX_CONNECTIONS,
                n,
            ),
            ("httpx.Client, 16 threads", bare_http_httpx_threads, url, 16, n),
            (
                f"asyncio HTTP/1.1 client without a library, {http} connections",
                bare_http_raw,
                peer.port,
                http,
                raw_n,
            ),
        ]
    rates, lines = {}, []
    for name, function, target, connections, n in variants:
        meter = CpuMeter({"peer": peer.pid})
        begin = peer.count()
        meter.start()
        sender_cpu = run_in_process(function, target, sample, n, connections)
        records = wait_received(peer, begin, n, 60)
        meter.stop()
        rate = rates[name] = rate_of([t for _, t in records])
        role = "the bare sender" if name.startswith(BARE[kind]) else "for reference"
        lines.append(
            f"  {kind}s, {name} ({role}): {rate:,.0f}/s; sender CPU "
            f"{1000 * sender_cpu / n:.2f} ms per {kind}, peer "
            f"{1000 * meter.seconds['peer'] / n:.2f} ms; machine "
            f"{meter.machine_pct:.0f} % of {100 * os.cpu_count()} %"
        )
    return rates, lines


def notify_phase(kind, peer, topic, n, args, stack, key, groups, profile_dir) -> tuple:
    """Phase 2 or 3: a burst of ``n``, then a paced run; returns the burst's rate, the lines to
    print and the burst's ``CpuMeter``."""
    meter = CpuMeter(groups)
    begin = peer.count()
    peak = {"worker": 0.0}

    def sample_rss() -> None:
        peak["worker"] = max(peak["worker"], rss_mb(stack.worker.pid))

    profiler = None
    if profile_dir:
        out = profile_dir / f"worker-{kind}.txt"
        profiler = start_profile(stack.worker.pid, out, 600)
        time.sleep(1)  # py-spy attaches to every pool process first
    meter.start()
    posted = asyncio.run(post_burst(stack.base, key, topic, n, args.batch_size))
    records = wait_received(peer, begin, n, 60 + n / 20, sample_rss)
    meter.stop()
    if profiler:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)
    sample_rss()
    rate = rate_of([t for _, t in records])
    arrived = dict(records)
    rows = rows_of([i for i, _ in posted])
    latency = [r[1] for r in rows.values() if r[1] is not None]
    travel = [
        1000 * (arrived[str(rows[i][0])] - at) for i, at in posted if str(rows[i][0]) in arrived
    ]
    statuses = {
        s: sum(1 for r in rows.values() if r[2] == s) for s in {r[2] for r in rows.values()}
    }
    lines = [
        f"  burst of {n:,}: {rate:,.0f} {kind}s/s (target >= {TARGETS[kind]:,.0f}/s: "
        f"{verdict(rate, TARGETS[kind])})",
        f"    ingest-to-sent (latency_ms) {spread(latency)}; post-to-arrival {spread(travel)}",
        f"    rows: {statuses}; {len(records) - n} extra arrivals (redeliveries)",
        "    " + meter.line(n, kind),
        f"    worker RSS peak {peak['worker']:.0f} MB, "
        f"server RSS {rss_mb(stack.server.pid):.0f} MB",
    ]
    if profiler and out.exists():
        lines.append(f"    py-spy of the worker (collapsed stacks: {out}), busy samples:")
        lines += ["      " + line for line in summarize(out)]
    paced_rate = args.paced_rate
    begin = peer.count()
    posted = asyncio.run(post_paced(stack.base, key, topic, paced_rate, args.paced_s))
    records = wait_received(peer, begin, len(posted), 60)
    arrived = dict(records)
    rows = rows_of([i for i, _ in posted])
    latency = [r[1] for r in rows.values() if r[1] is not None]
    travel = [
        1000 * (arrived[str(rows[i][0])] - at) for i, at in posted if str(rows[i][0]) in arrived
    ]
    lines.append(
        f"  paced, {paced_rate:.0f}/s single posts for {args.paced_s:.0f} s ({len(posted)}, a task "
        f"of one delivery each): "
        f"ingest-to-sent {spread(latency)}; post-to-arrival {spread(travel)}"
    )
    return rate, lines, meter


def wait_quiet(args, what: str) -> None:
    """Other jobs share this machine: wait (up to ``--wait-quiet`` s) until the machine, ours
    idle, is busy less than ``--quiet-pct`` % of one core; say how busy it was."""
    deadline = time.monotonic() + args.wait_quiet
    while True:
        meter = CpuMeter({})
        meter.start()
        time.sleep(2)
        meter.stop()
        busy = meter.machine_pct
        if busy <= args.quiet_pct or time.monotonic() >= deadline:
            state = "quiet" if busy <= args.quiet_pct else "NOT quiet"
            print(
                f"(before {what}: the machine, ours idle, busy {busy:.0f} % of a core over 2 s: "
                f"{state}; every figure shares the cores with other jobs)",
                flush=True,
            )
            return


def configure(peers, args) -> None:
    refused = free_port()  # nothing listens there
    smtp, http, hung = peers["smtp"].port, peers["http"].port, peers["hung"].port
    url = {
        "email": lambda port: f"smtp://127.0.0.1:{port}",
        "webhook": lambda port: f"http://127.0.0.1:{port}/hook",
    }
    secret = {"email": "", "webhook": "HOOK_SECRET"}
    channel(
        "bench-email", "email", "bench.email", [dict(name="bench-email-1", url=url["email"](smtp))]
    )
    channel(
        "bench-webhook",
        "webhook",
        "bench.webhook",
        [dict(name="bench-webhook-1", url=url["webhook"](http), credentials_env="HOOK_SECRET")],
    )
    for kind, port in (("email", smtp), ("webhook", http)):
        b = dict(url=url[kind](port), credentials_env=secret[kind])
        for case, a_port, extra in (
            ("normal", None, {}),
            ("refused", refused, {}),
            ("hung", hung, {"breaker_call_timeout_ms": HUNG_TIMEOUT_MS}),
        ):
            name = f"fo-{kind}-{case}"
            providers = [dict(name=f"{name}-b", weight=1, **b)]
            if a_port:
                providers.insert(
                    0,
                    dict(
                        name=f"{name}-a",
                        weight=100,
                        url=url[kind](a_port),
                        credentials_env=secret[kind],
                    ),
                )
            channel(
                name,
                kind,
                f"fo.{kind}.{case}",
                providers,
                breaker_minimum_calls=NEVER_OPENS,
                **extra,
            )
    channel(
        "detect",
        "webhook",
        "detect.#",
        [
            dict(name="detect-a", weight=100, url=url["webhook"](refused)),
            dict(name="detect-b", weight=1, url=url["webhook"](http)),
        ],
        breaker_minimum_calls=20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (under 3 min)")
    parser.add_argument("--emails", type=int, help="measured emails (default 3000, quick 1000)")
    parser.add_argument("--webhooks", type=int, help="measured webhooks (6000, quick 2000)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=2, help="Celery pool processes")
    parser.add_argument("--paced-rate", type=float, default=25.0, help="posts/s when paced")
    parser.add_argument("--threads", type=int, default=0, help="DELIVERY_THREADS of the worker")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="py-spy the worker in 2 and 3")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="wait up to this many s for a quiet machine"
    )
    parser.add_argument(
        "--quiet-pct", type=float, default=15.0, help="quiet = busy less than this %% of a core"
    )
    args = parser.parse_args()
    args.emails = args.emails or (1000 if args.quick else 3000)
    args.webhooks = args.webhooks or (2000 if args.quick else 6000)
    args.paced_s = 3.0 if args.quick else 6.0
    probes = 8 if args.quick else 20
    warmup = 100 if args.quick else 300

    pg_server = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    print("\n".join(machine_report(pg_server, redis_url)), flush=True)
    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="notify-bench-delivery-"))
    peers = {
        "smtp": Peer("smtp", free_port()),
        "http": Peer("http", free_port()),
        "hung": Peer("hung", free_port()),
    }
    stack = new_stack(pg_server, redis_url)
    try:
        key = api_key()
        configure(peers, args)
        start(stack, args.concurrency, args.server_core, logs, args.threads)
        os.sched_setaffinity(0, {args.client_core})
        from django.conf import settings

        print(
            f"uvicorn on core {args.server_core}, load generator on core {args.client_core}; "
            f"Celery worker --concurrency {args.concurrency} --beat (not pinned), "
            f"DELIVERY_BATCH {settings.DELIVERY_BATCH}, DELIVERY_THREADS "
            f"{stack.env.get('DELIVERY_THREADS', settings.DELIVERY_THREADS)}; peers, Postgres "
            f"and Redis not pinned; logs {logs}",
            flush=True,
        )
        samples = {}
        for kind, peer_name, topic in (
            ("email", "smtp", "bench.email"),
            ("webhook", "http", "bench.webhook"),
        ):
            peer = peers[peer_name]
            begin = peer.count()
            asyncio.run(post_burst(stack.base, key, topic, warmup, args.batch_size))
            wait_received(peer, begin, warmup, 120)
            samples[kind] = peer.sample()
        print(f"warm-up: {warmup} of each through notify ({time.monotonic() - started:.0f} s)")

        wait_quiet(args, "phase 1")
        print(
            "1. bare sender (the limit): a plain asyncio loop in a process of its own sending the "
            "messages notify sent in the warm-up to the same peers over kept connections, the "
            f"protocol spoken over asyncio streams: SMTP ({BARE_SMTP_CONNECTIONS} connections), "
            f"HTTP/1.1 ({BARE_HTTP_CONNECTIONS} connections); library clients for reference:"
        )
        limits = {}
        for kind, peer_name, n in (
            ("email", "smtp", args.emails),
            ("webhook", "http", args.webhooks),
        ):
            rates, lines = bare_phase(kind, peers[peer_name], samples[kind], n)
            limits[kind] = rates
            print("\n".join(lines), flush=True)

        profile_dir = logs if args.profile else None
        groups = {
            "worker": stack.worker.pid,
            "server": stack.server.pid,
            "postgres": "postgres",
            "redis": "redis-server",
        }
        rates, meters = {}, {}
        for number, kind, peer_name, n in (
            (2, "email", "smtp", args.emails),
            (3, "webhook", "http", args.webhooks),
        ):
            wait_quiet(args, f"phase {number}")
            print(f"{number}. {kind}s through notify (one provider, batches of {args.batch_size}):")
            peer = peers[peer_name]
            rates[kind], lines, meters[kind] = notify_phase(
                kind,
                peer,
                f"bench.{kind}",
                n,
                args,
                stack,
                key,
                {**groups, "peer": peer.pid, "generator": [os.getpid()]},
                profile_dir,
            )
            [(bare_name, bare)] = [
                (k, r) for k, r in limits[kind].items() if k.startswith(BARE[kind])
            ]
            share = 100 * rates[kind] / bare
            others = "; ".join(
                f"{100 * rates[kind] / r:.0f} % of {name.split(',')[0]}"
                for name, r in limits[kind].items()
                if name != bare_name
            )
            lines.insert(
                1,
                f"    = {share:.1f} % of the bare sender's {bare:,.0f}/s ({bare_name}; target >= "
                f"{TARGET_SHARE:.0f} %: {verdict(share, TARGET_SHARE)}); for reference {others}",
            )
            print("\n".join(lines), flush=True)

        wait_quiet(args, "phase 4")
        print(f"4. failover, one notification at a time ({probes} each):")
        print("\n".join(failover_phase(stack, key, peers, probes)), flush=True)
        print("\n".join(detection_phase(stack, key, 100.0)), flush=True)

        print("5. processes:")
        print(
            f"  worker RSS now {rss_mb(stack.worker.pid):.0f} MB (main + {args.concurrency} pool "
            f"processes), server RSS {rss_mb(stack.server.pid):.0f} MB"
        )
        for kind, n in (("email", args.emails), ("webhook", args.webhooks)):
            used = meters[kind].seconds
            worker_ms = 1000 * used["worker"] / n
            stack_ms = 1000 * sum(used[g] for g in ("worker", "server", "postgres", "redis")) / n
            ceiling = os.cpu_count() * 1000 / stack_ms
            print(
                f"  per {kind}: worker CPU {worker_ms:.2f} ms ({used['worker']:.1f} s for {n:,}); "
                f"worker + server + Postgres + Redis {stack_ms:.2f} ms, so {os.cpu_count()} "
                f"cores given to notify alone would send at most {ceiling:,.0f} {kind}s/s "
                f"(target {TARGETS[kind]:,.0f}/s)"
            )
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"  load average now {load}; the run took {time.monotonic() - started:.0f} s")
    finally:
        stop(stack)
        for peer in peers.values():
            peer.stop()


if __name__ == "__main__":
    main()
