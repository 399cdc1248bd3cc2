"""A rule's figure per scope over its window, from the merged snapshots (metrics/figures.py).

``scoped(rule, window)`` answers ``{scope_value: value}``: ``""`` is everything together; a
value of None means nothing was observed for that scope (no delivery, no attempt), which never
holds a condition. What each metric reads:

- ``latency_p95_s`` / ``latency_p99_s``: the quantile of ``notify_delivery_duration_seconds``;
  scope ``channel`` by its ``channel`` label, ``transport`` by the same label restricted to the
  realtime transports (the realtime path labels its observations with the transport);
- ``error_rate``: failed / attempts of ``notify_delivery_attempts_total`` (``started`` is not an
  attempt's outcome); scope ``channel``, or ``provider`` as ``<channel>/<provider>`` (how
  ``notify_breaker_state`` names providers);
- ``connection_drop_rate``: connections closed not by their client over those open at the
  window's start, per ``transport``;
- ``memory_bytes``: the latest ``notify_process_resident_memory_bytes``, per ``role``;
- ``queue_depth``: the latest ``notify_celery_queue_length`` (everything together only);
- ``recorded``: any metric by name: a counter's rate per second, a gauge's latest value, a
  histogram's p95; per scope by the label named like the scope (a histogram labelled only by
  ``channel`` is read for ``transport`` as above).

A scope a metric has no label for raises ``UnsupportedScope`` (``SCOPES`` lists the ones each
metric has; ``AlertRule.clean`` refuses the others at save).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ..metrics.figures import FAILED_OUTCOMES, Merged, quantile
from ..metrics.instruments import REALTIME_TRANSPORTS
from .models import AlertRule

Metric = AlertRule.Metric
Scope = AlertRule.Scope
LATENCY = "notify_delivery_duration_seconds"
ATTEMPTS = "notify_delivery_attempts_total"
CLOSED = "notify_connections_closed_total"
ACTIVE = "notify_connections_active"
CLIENT_CLOSES = ("client", "normal")  # reasons that are the client's own choice, not a drop
RECORDED_QUANTILE = 0.95

SCOPES: dict[str, tuple[str, ...]] = {
    Metric.LATENCY_P95: (Scope.ALL, Scope.CHANNEL, Scope.TRANSPORT),
    Metric.LATENCY_P99: (Scope.ALL, Scope.CHANNEL, Scope.TRANSPORT),
    Metric.ERROR_RATE: (Scope.ALL, Scope.CHANNEL, Scope.PROVIDER),
    Metric.CONNECTION_DROP: (Scope.ALL, Scope.TRANSPORT),
    Metric.MEMORY: (Scope.ALL, Scope.ROLE),
    Metric.QUEUE_DEPTH: (Scope.ALL,),
    Metric.RECORDED: tuple(Scope.values),  # by the metric's labels, known only at evaluation
}


class UnsupportedScope(ValueError):
    """The rule's metric has no label for its scope."""


def scoped(rule: AlertRule, a: Merged, b: Merged) -> dict[str, float | None]:
    """``{scope_value: figure}`` of ``rule`` between ``a`` and ``b`` (the first and last merged
    snapshots of its window), limited to ``rule.scope_value`` when it names one."""
    if rule.scope not in SCOPES[rule.metric]:
        raise UnsupportedScope(f"{rule.metric} has no figure per {rule.scope}")
    read = {
        Metric.LATENCY_P95: lambda: _latency(rule.scope, a, b, 0.95),
        Metric.LATENCY_P99: lambda: _latency(rule.scope, a, b, 0.99),
        Metric.ERROR_RATE: lambda: _error_rate(rule.scope, a, b),
        Metric.CONNECTION_DROP: lambda: _drop_rate(rule.scope, a, b),
        Metric.MEMORY: lambda: _latest(b, "notify_process_resident_memory_bytes", rule.scope),
        Metric.QUEUE_DEPTH: lambda: {"": b.total("notify_celery_queue_length")},
        Metric.RECORDED: lambda: _recorded(rule.metric_name, rule.scope, a, b),
    }[rule.metric]
    figures = read()
    if rule.scope != Scope.ALL and rule.scope_value:
        return {rule.scope_value: figures.get(rule.scope_value)}
    return figures


def _label_values(snap: Merged, name: str, label: str) -> set[str]:
    return {labels[label] for labels, _ in snap.select(name) if label in labels}


def _by_scope(scope: str, values: Iterable[str]) -> list[str]:
    if scope == Scope.TRANSPORT:
        return sorted(v for v in values if v in REALTIME_TRANSPORTS)
    return sorted(values)


def _latency(scope: str, a: Merged, b: Merged, q: float) -> dict[str, float | None]:
    if scope == Scope.ALL:
        return {"": quantile(a, b, LATENCY, q)}
    channels = _by_scope(scope, _label_values(b, f"{LATENCY}_bucket", "channel"))
    return {c: quantile(a, b, LATENCY, q, channel=c) for c in channels}


def _increases(a: Merged, b: Merged, name: str) -> Iterable[tuple[dict[str, str], float]]:
    """Each series of counter ``name`` in ``b`` with its increase since ``a`` (a series that
    went down, its process restarted, counts as no increase)."""
    for (sample, labels), value in b.values.items():
        if sample == name:
            yield dict(labels), max(0.0, value - a.values.get((sample, labels), 0.0))


def _error_rate(scope: str, a: Merged, b: Merged) -> dict[str, float | None]:
    def key(labels: dict[str, str]) -> str:
        if scope == Scope.CHANNEL:
            return labels.get("channel", "")
        if scope == Scope.PROVIDER:
            return f"{labels.get('channel', '')}/{labels.get('provider', '')}"
        return ""

    attempts: dict[str, float] = defaultdict(float)
    failed: dict[str, float] = defaultdict(float)
    if scope == Scope.ALL:
        attempts[""] = 0.0
    for labels, increase in _increases(a, b, ATTEMPTS):
        outcome = labels.get("outcome")
        if outcome == "started":
            continue  # a call begun, not an attempt's outcome
        attempts[key(labels)] += increase
        if outcome in FAILED_OUTCOMES:
            failed[key(labels)] += increase
    return {k: (failed[k] / n if n else 0.0) for k, n in sorted(attempts.items())}


def _drop_rate(scope: str, a: Merged, b: Merged) -> dict[str, float | None]:
    def key(labels: dict[str, str]) -> str:
        return labels.get("transport", "") if scope == Scope.TRANSPORT else ""

    opened: dict[str, float] = defaultdict(float)  # open at the window's start
    closed: dict[str, float] = defaultdict(float)
    for labels, value in a.select(ACTIVE):
        opened[key(labels)] += value
    for labels, increase in _increases(a, b, CLOSED):
        if labels.get("reason") not in CLIENT_CLOSES:
            closed[key(labels)] += increase
    scopes = set(opened) | set(closed) | {key(labels) for labels, _ in b.select(ACTIVE)}
    if scope == Scope.ALL:
        scopes = {""}
    return {s: (closed[s] / opened[s] if opened[s] else 0.0) for s in sorted(scopes)}


def _latest(b: Merged, name: str, scope: str, label: str | None = None) -> dict[str, float | None]:
    if scope == Scope.ALL:
        return {"": b.total(name)} if any(True for _ in b.select(name)) else {"": None}
    label = label or _scope_label(scope, b, name)
    return dict(sorted(b.by(name, label).items()))


def _scope_label(scope: str, snap: Merged, name: str) -> str:
    """The label of ``name`` that scope ``scope`` groups by."""
    labels = {k for sample_labels, _ in snap.select(name) for k in sample_labels}
    if scope in labels:
        return scope
    if scope == Scope.TRANSPORT and "channel" in labels:
        return "channel"
    raise UnsupportedScope(f"{name} has no label for {scope}")


def _recorded(name: str, scope: str, a: Merged, b: Merged) -> dict[str, float | None]:
    """A recorded metric by its name: counter (``name`` or ``name_total``), histogram
    (``name_bucket``) or gauge."""
    names = {sample for sample, _ in b.values}
    counter = name if name.endswith("_total") and name in names else f"{name}_total"
    if counter in names:
        return _counter_rate(counter, scope, a, b)
    if f"{name}_bucket" in names:
        if scope == Scope.ALL:
            return {"": quantile(a, b, name, RECORDED_QUANTILE)}
        label = _scope_label(scope, b, f"{name}_bucket")
        values = _by_scope(scope, _label_values(b, f"{name}_bucket", label))
        return {v: quantile(a, b, name, RECORDED_QUANTILE, **{label: v}) for v in values}
    if name not in names:
        return {"": None} if scope == Scope.ALL else {}  # not recorded (yet): nothing holds
    if scope == Scope.ALL:
        return _latest(b, name, scope)
    label = _scope_label(scope, b, name)
    out = _latest(b, name, scope, label)
    return {k: v for k, v in out.items() if k in _by_scope(scope, out)}


def _counter_rate(name: str, scope: str, a: Merged, b: Merged) -> dict[str, float | None]:
    seconds = b.at - a.at
    label = _scope_label(scope, b, name) if scope != Scope.ALL else ""
    increases: dict[str, float] = defaultdict(float)
    if scope == Scope.ALL:
        increases[""] = 0.0
    for labels, increase in _increases(a, b, name):
        increases[labels.get(label, "")] += increase
    keep = {""} if scope == Scope.ALL else set(_by_scope(scope, increases))
    return {
        k: (v / seconds if seconds > 0 else None) for k, v in sorted(increases.items()) if k in keep
    }
