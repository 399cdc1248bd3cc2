"""``notify_alerts{rule,state}``: alerts per rule that are pending, firing, or fired and were
resolved in the last hour (``service.RESOLVED_RECENT``); every rule has all three (0 when
none), so a Prometheus query sees a rule's alert end. Read at collection, like
metrics/state.py's gauges."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from ..metrics import state
from . import service


def read_alerts() -> Iterable[Metric]:
    family = GaugeMetricFamily(
        "notify_alerts",
        "Alerts per rule: pending, firing, and resolved in the last hour.",
        labels=["rule", "state"],
    )
    for rule, by_state in service.counts().items():
        for name, count in by_state.items():
            family.add_metric([rule, name], count)
    yield family


if read_alerts not in state.readers:
    state.readers.append(read_alerts)
