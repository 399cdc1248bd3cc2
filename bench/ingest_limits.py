"""The database's own limits for bench/ingest.py, measured on the bench's database in the same run.

- ``statement_limit``: pgbench runs the statement a single post runs (stream_writes.py's one-topic
  form: the topic's ``UPDATE ... RETURNING`` in a CTE feeding the ``INSERT``), each in its own
  transaction, from ``clients`` connections: what Postgres alone does with one transaction per
  notification, no web stack, no group commit.
- ``copy_limit``: from one client, transactions of ``batch`` rows as a batch post stores them (the
  topic's ``UPDATE`` then a ``COPY`` of the rows): the database's limit for batches.

pgbench with ``-R rate`` gives the same statement's latency at a light, paced load (the single
post latency's floor). Rows go to topics named ``limit.*``, which ``check_stored`` checks too.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

DATA = json.dumps({"client": 0, "n": 0, "note": "a typical small payload of some bytes"})

# The one-topic statement of stream_writes._insert_statement, for one row.
_STATEMENT = f"""\\set t random(0, :topics - 1)
WITH t AS (UPDATE routing_app_topic SET last_seq = last_seq + 1 WHERE name = 'limit.t' || :t
           RETURNING id, last_seq)
INSERT INTO routing_app_notification
    (topic_id, seq, id, source, event, severity, data, idempotency_key, body_hash, created_at)
SELECT t.id, t.last_seq, gen_random_uuid(), 'api', 'bench.tick', 'info', '{DATA}'::jsonb, NULL,
       '', now() FROM t RETURNING topic_id, seq;
"""  # noqa: S608  (a constant payload, no input)


@dataclass
class Limit:
    name: str
    per_s: float
    latencies_ms: list[float]

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def line(self) -> str:
        return (
            f"{self.name}: {self.per_s:,.0f} notifications/s; latency p50 "
            f"{self.percentile_ms(0.5):.2f} ms, p95 {self.percentile_ms(0.95):.2f} ms, p99 "
            f"{self.percentile_ms(0.99):.2f} ms"
        )


def create_topics(db_url: str, topics: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO routing_app_topic (name, description, last_seq, retention_count, "
            "retention_days, created_at) SELECT 'limit.t' || i, '', 0, 0, 0, now() "
            "FROM generate_series(0, %s - 1) AS i ON CONFLICT (name) DO NOTHING",
            [topics],
        )


def statement_limit(
    db_url: str, clients: int, duration_s: float, topics: int, rate: float | None = None
) -> Limit:
    """pgbench: ``clients`` connections running the single-post statement, one transaction each
    (``rate``: paced at that many transactions/s in all, else as fast as they can)."""
    create_topics(db_url, topics)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "single.sql")
        script.write_text(_STATEMENT)
        argv = ["pgbench", "-n", "-M", "prepared", "-f", str(script), "-D", f"topics={topics}"]
        argv += ["-c", str(clients), "-j", str(min(clients, 2)), "-T", str(max(1, int(duration_s)))]
        argv += ["-l", "--log-prefix", str(Path(tmp, "log"))]
        if rate:
            argv += ["-R", str(rate)]
        out = subprocess.run(argv + [db_url], capture_output=True, text=True, check=True).stdout
        latencies = []
        for log in Path(tmp).glob("log*"):
            for line in log.read_text().splitlines():
                fields = line.split()  # client, transaction, time us, script, epoch, us[, lag]
                lag_us = int(fields[6]) if len(fields) > 6 else 0
                latencies.append((int(fields[2]) - lag_us) / 1000)
    tps = next(float(line.split("=")[1].split()[0]) for line in out.splitlines() if "tps" in line)
    paced = f" paced at {rate:.0f}/s" if rate else ""
    name = f"Postgres alone: the single-post statement, pgbench x{clients}{paced}"
    return Limit(name, tps, latencies)


def copy_limit(db_url: str, batch: int, duration_s: float, topics: int) -> Limit:
    """One client: per transaction, the topic's UPDATE then a COPY of ``batch`` rows."""
    create_topics(db_url, topics)
    latencies, rows, n = [], 0, 0
    with psycopg.connect(db_url) as conn:
        stop = time.perf_counter() + duration_s
        started = time.perf_counter()
        while time.perf_counter() < stop:
            began = time.perf_counter()
            with conn.transaction():
                topic_id, last = conn.execute(
                    "UPDATE routing_app_topic SET last_seq = last_seq + %s WHERE name = %s "
                    "RETURNING id, last_seq",
                    [batch, f"limit.t{n % topics}"],
                ).fetchone()
                with conn.cursor().copy(
                    "COPY routing_app_notification (id, topic_id, seq, source, event, severity, "
                    "data, idempotency_key, body_hash, created_at) FROM STDIN"
                ) as copy:
                    now = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime())
                    for k in range(batch):
                        seq = last - batch + 1 + k
                        copy.write_row(
                            [uuid.uuid4(), topic_id, seq, "api", "bench.tick", "info", DATA]
                            + [None, "", now]
                        )
            latencies.append(1000 * (time.perf_counter() - began))
            rows += batch
            n += 1
        elapsed = time.perf_counter() - started
    return Limit(f"Postgres alone: COPY of {batch}-row transactions x1", rows / elapsed, latencies)
