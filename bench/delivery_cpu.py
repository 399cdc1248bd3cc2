"""CPU and queries per delivery of the delivery service alone, measured in one process: figures
that the machine's load does not move (bench/delivery.py's throughputs do).

    .venv/bin/python bench/delivery_cpu.py                 # email and webhook, 1,000 each
    .venv/bin/python bench/delivery_cpu.py --n 2000 --profile   # also cProfile, top functions

A fresh database (on BENCH_PG_URL's server), Redis (REDIS_URL, a prefix of its own) for the
breakers and the limiter, the peers of bench/delivery.py (an aiosmtpd server, a webhook receiver,
each a process). Notifications are ingested in this process with the task enqueue switched off;
then ``service.deliver`` runs on batches of ``DELIVERY_BATCH`` ids, exactly what the Celery task
does, and this process's CPU time (every thread) and its SQL statements are counted per batch.
Redis round trips are counted too (commands sent through redis-py's connections). Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from delivery_load import wait_received  # noqa: E402
from delivery_peers import Peer  # noqa: E402
from delivery_stack import channel, new_stack, stop, summarize  # noqa: E402
from ingest import free_port  # noqa: E402


class RedisCounter:
    """Counts redis-py round trips: a command or a pipeline's execute is one."""

    def __init__(self) -> None:
        import redis.client

        self.count = 0
        for cls, name in (
            (redis.client.Redis, "execute_command"),
            (redis.client.Pipeline, "execute"),
        ):
            original = getattr(cls, name)

            def counting(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            setattr(cls, name, counting)


def spy_on(pid: int, out: Path) -> subprocess.Popen:
    """py-spy on this process alone (not the peers, its children), threads holding the GIL."""
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "-o", str(out)]
    argv += ["--rate", "200", "--nonblocking", "--gil"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ingest_batch(topic: str, n: int) -> list[int]:
    from django.db import transaction

    from routing_app.ingest import NotificationIn, ingest
    from routing_app.models import Delivery

    items = [
        NotificationIn(
            topic=topic,
            event="bench.tick",
            severity="info",
            data={"n": i, "host": "web-1", "note": "a typical small payload of some bytes"},
        )
        for i in range(n)
    ]
    with transaction.atomic():
        ids = [r.id for r in ingest(items)]
    return list(
        Delivery.objects.filter(notification_id__in=ids).order_by("pk").values_list("pk", flat=True)
    )


def measure(
    kind: str,
    topic: str,
    peer: Peer,
    n: int,
    profile: bool,
    show_sql: bool = False,
    spy: Path | None = None,
) -> list[str]:
    from django.conf import settings
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from routing_app.delivery import service
    from routing_app.models import Delivery

    batch = settings.DELIVERY_BATCH
    warm = ingest_batch(topic, batch)
    begin = peer.count()
    service.deliver(warm)
    wait_received(peer, begin, len(warm), 60)
    ids = ingest_batch(topic, n)
    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    redis_counter = RedisCounter()
    profiler = cProfile.Profile() if profile else None
    queries = []
    cpu = 0.0
    begin = peer.count()
    spying = None
    if spy:
        spying = spy_on(os.getpid(), spy)
        time.sleep(1)  # py-spy attaches
    wall = time.perf_counter()
    for chunk in chunks:
        with CaptureQueriesContext(connection) as captured:
            started = time.process_time()
            if profiler:
                profiler.enable()
            service.deliver(chunk)
            if profiler:
                profiler.disable()
            cpu += time.process_time() - started
        queries.append(len(captured.captured_queries))
        if show_sql and len(queries) == 1:
            for q in captured.captured_queries:
                print("   ", q["sql"][:160], flush=True)
    wall = time.perf_counter() - wall
    if spying:
        spying.send_signal(signal.SIGINT)
        spying.wait(60)
    wait_received(peer, begin, n, 60)
    statuses = dict(
        Delivery.objects.filter(pk__in=ids).values_list("status").annotate(n=models_count())
    )
    lines = [
        f"{kind}: {n:,} in batches of {batch}: CPU {1000 * cpu / n:.2f} ms per delivery "
        f"({cpu:.2f} s, this process, every thread); {sum(queries) / len(queries):.1f} SQL "
        f"statements per batch (on this thread; min {min(queries)}, max {max(queries)}); "
        f"{redis_counter.count / n:.2f} Redis round trips per delivery; {n / wall:,.0f}/s "
        f"wall; rows {statuses}"
    ]
    if spy and spy.exists():
        lines.append(f"py-spy --gil of the batches (collapsed stacks: {spy}), busy samples:")
        lines += ["  " + line for line in summarize(spy, top=25)]
    if profiler:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(45)
        lines.append(out.getvalue())
    return lines


def models_count():
    from django.db.models import Count

    return Count("pk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="deliveries of each kind")
    parser.add_argument("--kinds", default="email,webhook")
    parser.add_argument("--profile", action="store_true", help="cProfile of the batches")
    parser.add_argument("--sql", action="store_true", help="print the first batch's statements")
    parser.add_argument(
        "--py-spy", action="store_true", help="py-spy (every thread) of the batches"
    )
    args = parser.parse_args()
    pg_server = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    peers = {"email": Peer("smtp", free_port()), "webhook": Peer("http", free_port())}
    stack = new_stack(pg_server, redis_url)
    try:
        from routing_app.delivery import dispatch

        dispatch.schedule = lambda ids, at=None: None  # this process runs the batches itself
        channel(
            "bench-email",
            "email",
            "bench.email",
            [dict(name="bench-email-1", url=f"smtp://127.0.0.1:{peers['email'].port}")],
        )
        channel(
            "bench-webhook",
            "webhook",
            "bench.webhook",
            [
                dict(
                    name="bench-webhook-1",
                    url=f"http://127.0.0.1:{peers['webhook'].port}/hook",
                    credentials_env="HOOK_SECRET",
                )
            ],
        )
        spy_dir = Path(tempfile.mkdtemp(prefix="notify-delivery-cpu-")) if args.py_spy else None
        for kind in args.kinds.split(","):
            spy = spy_dir / f"{kind}.txt" if spy_dir else None
            lines = measure(kind, f"bench.{kind}", peers[kind], args.n, args.profile, args.sql, spy)
            for line in lines:
                print(line, flush=True)
    finally:
        stop(stack)
        for peer in peers.values():
            peer.stop()


if __name__ == "__main__":
    main()
