"""Figures from snapshots (snapshot.py): what the dashboard charts and the alert rules compare.

Snapshots of all hosts taken in the same interval are summed (``merge``); a figure over a window
is computed from the first and last merged snapshot in it: counters as rates, histograms as
quantiles of the bucket increases (Prometheus' ``histogram_quantile``: linear within a bucket),
gauges as the latest value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Merged:
    """All hosts' samples of one interval, summed: ``values[(name, sorted labels)]``."""

    at: float
    values: dict[Key, float]
    hosts: int

    def select(self, name: str, **match: str) -> Iterable[tuple[dict[str, str], float]]:
        for (sample, labels), value in self.values.items():
            if sample == name and all(dict(labels).get(k) == v for k, v in match.items()):
                yield dict(labels), value

    def total(self, name: str, exclude: dict[str, Iterable[str]] | None = None, **match) -> float:
        """Sum of ``name``'s samples whose labels match ``match`` and none of ``exclude``."""
        out = 0.0
        for labels, value in self.select(name, **match):
            if exclude and any(labels.get(k) in set(v) for k, v in exclude.items()):
                continue
            out += value
        return out

    def by(self, name: str, label: str, **match) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.select(name, **match):
            out[labels.get(label, "")] += value
        return dict(out)


def merge(history: dict[str, list[dict]]) -> list[Merged]:
    """Every host's snapshots, summed per interval, oldest first. A host missing from an
    interval (it published a moment late) counts with its previous snapshot."""
    step = settings.METRICS_SNAPSHOT_S
    slots: dict[int, dict[str, dict]] = defaultdict(dict)
    for host, snaps in history.items():
        for snap in snaps:
            slots[round(snap["at"] / step)][host] = snap
    merged = []
    last: dict[str, dict] = {}
    for slot in sorted(slots):
        last.update(slots[slot])
        values: dict[Key, float] = defaultdict(float)
        for snap in last.values():
            for name, labels, value in snap["samples"]:
                values[(name, tuple(sorted(labels.items())))] += value
        merged.append(Merged(at=slot * step, values=dict(values), hosts=len(last)))
    return merged


def rate(a: Merged, b: Merged, name: str, **match) -> float:
    """Per-second increase of counter ``name`` from ``a`` to ``b`` (a process restart that
    lowered the sum counts as no increase)."""
    seconds = b.at - a.at
    if seconds <= 0:
        return 0.0
    return max(0.0, b.total(name, **match) - a.total(name, **match)) / seconds


def increase(a: Merged, b: Merged, name: str, exclude=None, **match) -> float:
    return max(0.0, b.total(name, exclude, **match) - a.total(name, exclude, **match))


def _buckets(snap: Merged, name: str, **match) -> dict[float, float]:
    out: dict[float, float] = defaultdict(float)
    for labels, value in snap.select(f"{name}_bucket", **match):
        out[float(labels["le"])] += value
    return out


def quantile(a: Merged, b: Merged, name: str, q: float, **match) -> float | None:
    """The ``q`` quantile (0..1) of histogram ``name``'s observations between ``a`` and ``b``,
    in its unit; None when nothing was observed."""
    before, after = _buckets(a, name, **match), _buckets(b, name, **match)
    bounds = sorted(after)
    counts = [max(0.0, after[le] - before.get(le, 0.0)) for le in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for le, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(le):
                return lower_bound  # above the highest finite bucket: its bound, as Prometheus
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return bounds[-2] if len(bounds) > 1 else None


def share_above(a: Merged, b: Merged, name: str, threshold: float, **match) -> float | None:
    """The share (0..1) of ``name``'s observations between ``a`` and ``b`` above
    ``threshold`` (a bucket bound: 0.1 is one), or None without observations."""
    before, after = _buckets(a, name, **match), _buckets(b, name, **match)
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    if total <= 0:
        return None
    at_or_below = after.get(threshold, 0.0) - before.get(threshold, 0.0)
    return max(0.0, (total - at_or_below) / total)


# --- the standard figures --------------------------------------------------------------------

FAILED_OUTCOMES = ("transient", "permanent", "timeout")


def overview(a: Merged, b: Merged) -> dict[str, float | dict | None]:
    """The overview's figures between two merged snapshots (the dashboard's cards and charts,
    and what the seeded alert rules compare)."""
    attempts = increase(a, b, "notify_delivery_attempts_total", exclude={"outcome": ["started"]})
    failed = sum(
        increase(a, b, "notify_delivery_attempts_total", outcome=o) for o in FAILED_OUTCOMES
    )
    active = b.by("notify_connections_active", "transport")
    closed = increase(
        a, b, "notify_connections_closed_total", exclude={"reason": ["client", "normal"]}
    )
    opened_before = a.total("notify_connections_active")
    latency = "notify_delivery_duration_seconds"
    return {
        "notifications_in_per_s": rate(a, b, "notify_notifications_ingested_total"),
        "notifications_out_per_s": rate(a, b, "notify_messages_sent_total")
        + rate(a, b, "notify_delivery_attempts_total", outcome="sent"),
        "latency_p50_s": quantile(a, b, latency, 0.5),
        "latency_p95_s": quantile(a, b, latency, 0.95),
        "latency_p99_s": quantile(a, b, latency, 0.99),
        "error_rate": failed / attempts if attempts else 0.0,
        "connections_active": active,
        "connections_total": sum(active.values()),
        "connection_drop_rate": closed / opened_before if opened_before else 0.0,
        "queue_depth": b.total("notify_celery_queue_length"),
        "queue_oldest_age_s": max(
            b.by("notify_celery_queue_oldest_age_seconds", "queue").values(), default=0.0
        ),
        "memory_bytes": b.by("notify_process_resident_memory_bytes", "role"),
        "cpu_per_s": {
            role: rate(a, b, "notify_process_cpu_seconds_total", role=role)
            for role in b.by("notify_process_cpu_seconds_total", "role")
        },
    }
