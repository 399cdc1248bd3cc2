"""The overview's chart points, from the hosts' metrics snapshots (``metrics.snapshot``).

A point is ``{"at": epoch s, **figures.overview(a, b)}`` for two consecutive merged snapshots
``a`` and ``b``: rates over one snapshot interval, latency quantiles of the deliveries finished in
it, gauges as ``b`` saw them. The page draws the last 15 minutes of points at load and appends
each tick's point (``ticks``), which is computed the same way, so a reload shows the same line.
"""

from __future__ import annotations

from itertools import pairwise

from django.conf import settings

from ..metrics import figures, snapshot

# Snapshots read for one tick: the two latest merged intervals, with room for a host that
# published a moment late.
TICK_SNAPSHOTS = 3


def point(a: figures.Merged, b: figures.Merged) -> dict:
    """The chart point between two merged snapshots (JSON-ready)."""
    return {"at": b.at, **figures.overview(a, b)}


def history_points(history: dict[str, list[dict]] | None = None) -> list[dict]:
    """Every point of the kept history (default: ``snapshot.history()``), oldest first; empty
    before two snapshots exist."""
    merged = figures.merge(snapshot.history() if history is None else history)
    return [point(a, b) for a, b in pairwise(merged)]


def latest_point() -> dict | None:
    """The newest point (what a tick carries), or None before two snapshots exist."""
    seconds = TICK_SNAPSHOTS * settings.METRICS_SNAPSHOT_S
    merged = figures.merge(snapshot.history(seconds))
    if len(merged) < 2:
        return None
    return point(merged[-2], merged[-1])


# --- the overview's cards: each a chart and its latest numbers ---------------------------------
# static/dashboard/overview.js draws the same cards from the same point fields, with the same
# units; keep the two in step.


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def card_series(point: dict) -> dict[str, dict[str, float | None]]:
    """card name -> series label -> value, in the card's unit (see ``CARDS``)."""
    return {
        "throughput": {
            "in": point["notifications_in_per_s"],
            "out": point["notifications_out_per_s"],
        },
        "latency": {
            "p50": _ms(point["latency_p50_s"]),
            "p95": _ms(point["latency_p95_s"]),
            "p99": _ms(point["latency_p99_s"]),
        },
        "errors": {"errors": point["error_rate"] * 100},
        "connections": dict(sorted(point["connections_active"].items())) or {"total": 0.0},
        "queue": {"depth": point["queue_depth"], "oldest (s)": point["queue_oldest_age_s"]},
        "memory": {k: v / 1e6 for k, v in sorted(point["memory_bytes"].items())},
        "cpu": {k: v * 100 for k, v in sorted(point["cpu_per_s"].items())},
    }


# name, title, unit, decimals
CARDS = [
    ("throughput", "Notifications", "/s", 1),
    ("latency", "Delivery latency", "ms", 0),
    ("errors", "Delivery error rate", "%", 1),
    ("connections", "Active connections", "", 0),
    ("queue", "Delivery queue", "", 0),
    ("memory", "Memory per role", "MB", 0),
    ("cpu", "CPU per role", "%", 1),
]


def format_value(value: float | None, unit: str, decimals: int) -> str:
    if value is None:
        return "–"
    text = f"{value:,.{decimals}f}"
    return f"{text} {unit}".strip() if unit != "/s" else f"{text}/s"


def cards(point: dict | None) -> list[dict]:
    """The overview's cards for ``point`` (None: before the first point, every card empty)."""
    series = card_series(point) if point else {}
    return [
        {
            "name": name,
            "title": title,
            "unit": unit,
            "decimals": decimals,
            "values": [
                (label, format_value(value, unit, decimals))
                for label, value in series.get(name, {}).items()
            ],
        }
        for name, title, unit, decimals in CARDS
    ]
