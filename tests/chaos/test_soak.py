"""The soak in a bounded form: bench/soak.py's own code with a few hundred connections and
13,000 notifications (1,000 of them to warm up) at 400/s, half a minute. The long form (25,000
connections, 1,000 notifications/s, 10 minutes) is ``python bench/soak.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.chaos.report import record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import soak  # noqa: E402  (bench/ is not a package: its scripts import each other by name)

# As many notifications and deliveries as a minute at 200/s (the property is per notification:
# each one reaches every connection once and in order, and RSS does not grow with their count),
# in half the time: 2,400 deliveries/s are far from what two server processes sustain.
BOUNDED = soak.SoakOptions(
    connections=300,
    rate=400.0,
    duration_s=30.0,
    servers=2,
    topics=50,
    batch=10,
    warmup_s=2.5,
    drain_s=30.0,
)

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")),
        reason="the soak runs several server processes on one database: set DATABASE_URL to a "
        "Postgres server",
    ),
    pytest.mark.slow,
    pytest.mark.timeout(300),
]


def test_soak_every_seq_reaches_every_connection_once_in_order_and_rss_stays_flat(tmp_path):
    said: list[str] = []
    figures = soak.run(BOUNDED, tmp_path, say=said.append)
    record(
        "soak (bounded)",
        connections=figures["connections"],
        servers=BOUNDED.servers,
        duration_s=BOUNDED.duration_s,
        rate_per_s=BOUNDED.rate,
        published=figures["published"],
        delivered=figures["delivered"],
        received_per_connection_min=figures["received_per_connection_min"],
        received_per_connection_max=figures["received_per_connection_max"],
        lost=figures["lost"],
        duplicated=figures["duplicated"],
        out_of_order=figures["out_of_order"],
        errors=figures["errors"],
        p50_ms=figures["latency_p50_ms"],
        p95_ms=figures["latency_p95_ms"],
        p99_ms=figures["latency_p99_ms"],
        rss_start_mb=figures["rss_start_mb"],
        rss_end_mb=figures["rss_end_mb"],
        rss_max_growth_pct=figures["rss_max_growth_pct"],
    )
    report = soak.report(figures) + "\n" + "\n".join(said)
    assert soak.clean(figures), report
    assert figures["rss_flat"], report
