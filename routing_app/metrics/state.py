"""Gauges read when ``/metrics`` (or a snapshot) is collected, not recorded on any hot path:
deliveries by channel and status, each provider's breaker state and health, the Celery queues'
length and oldest message's age, resident memory and CPU time per role of this host's live
processes, alerts by rule and state, and the build.

The Celery queue's oldest age needs the time a message was sent: ``stamp_sent_at`` (connected to
``before_task_publish``) adds it to every message's headers (Flower cannot show queue depth or
age: it sees what workers report, not what waits in the broker).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable

from django.conf import settings
from django.db.models import Count
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .files import live_pids, role_directories, stat_fields

log = logging.getLogger(__name__)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUEUES = ("celery",)
# kombu's Redis transport keeps one list per priority step; these are its default steps.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")

# More readers of state (the alert rules add theirs); each returns metric families.
readers: list[Callable[[], Iterable[Metric]]] = []


def stamp_sent_at(headers=None, **_kwargs) -> None:
    """``before_task_publish``: the message's send time, for the queue's oldest age."""
    if headers is not None:
        headers.setdefault("notify_sent_at", time.time())


def _deliveries() -> Iterable[Metric]:
    from ..models import Delivery

    family = GaugeMetricFamily(
        "notify_deliveries",
        "Outbound deliveries by channel and status.",
        labels=["channel", "status"],
    )
    rows = Delivery.objects.values_list("channel__name", "status").annotate(n=Count("pk"))
    for channel, status, count in rows.order_by():
        family.add_metric([channel, status], count)
    yield family


def _providers() -> Iterable[Metric]:
    from ..delivery.breaker import BreakerConfig, BreakerUnavailable, State, breakers_from_settings
    from ..models import Channel, Provider

    states = GaugeMetricFamily(
        "notify_breaker_state",
        "1 for the state each provider's circuit breaker is in, 0 for the others.",
        labels=["provider", "state"],
    )
    healthy = GaugeMetricFamily(
        "notify_provider_healthy",
        "1 when the provider's last health check passed.",
        labels=["provider"],
    )
    breakers = breakers_from_settings()
    for provider in Provider.objects.select_related("channel").filter(
        channel__kind__in=Channel.OUTBOUND_KINDS
    ):
        name = str(provider)
        healthy.add_metric([name], 1 if provider.healthy and provider.enabled else 0)
        try:
            current = breakers.snapshot(provider.pk, BreakerConfig.for_channel(provider.channel))
        except BreakerUnavailable as exc:
            log.warning("breaker state of %s unavailable for metrics: %s", name, exc)
            continue
        for state in State:
            states.add_metric([name, str(state)], 1 if current.state == state else 0)
    yield states
    yield healthy


def _queues() -> Iterable[Metric]:
    length = GaugeMetricFamily(
        "notify_celery_queue_length", "Messages waiting in the Celery broker.", labels=["queue"]
    )
    oldest = GaugeMetricFamily(
        "notify_celery_queue_oldest_age_seconds",
        "Age of the oldest message waiting in the Celery broker (0 when empty).",
        labels=["queue"],
    )
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(
            settings.CELERY_BROKER_URL, socket_timeout=2, socket_connect_timeout=2
        )
        prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("global_keyprefix", "")
        now = time.time()
        try:
            for queue in QUEUES:
                keys = [f"{prefix}{queue}{suffix}" for suffix in PRIORITY_SUFFIXES]
                pipe = client.pipeline()
                for key in keys:
                    pipe.llen(key)
                    pipe.lindex(key, -1)  # kombu pushes left, pops right: the oldest is last
                answers = pipe.execute()
                waiting = sum(answers[0::2])
                sent = [_sent_at(raw) for raw in answers[1::2] if raw]
                length.add_metric([queue], waiting)
                oldest.add_metric([queue], max(0.0, now - min(sent)) if sent else 0.0)
        except redis.RedisError as exc:
            log.warning("Celery broker unavailable for metrics: %s", exc)
        finally:
            client.close()
    else:  # the embedded loop's queue
        from ..delivery import embedded

        waiting, age = embedded.queue_state()
        length.add_metric(["embedded"], waiting)
        oldest.add_metric(["embedded"], age)
    yield length
    yield oldest


def _sent_at(raw: bytes) -> float:
    try:
        return float(json.loads(raw)["headers"]["notify_sent_at"])
    except (ValueError, KeyError, TypeError):
        return time.time()  # a message from before the stamp: counted, its age unknown


def process_usage(pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of a live process; (0, 0.0) when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            resident = int(statm.read().split()[1]) * PAGE_BYTES
        fields = stat_fields(pid)
        return resident, (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0, 0.0


def _processes() -> Iterable[Metric]:
    memory = GaugeMetricFamily(
        "notify_process_resident_memory_bytes",
        "Resident memory of this host's live notify processes, summed per role.",
        labels=["role"],
    )
    # Summed over the processes alive now: it drops when one ends, which Prometheus' rate()
    # takes as a counter reset.
    cpu = CounterMetricFamily(
        "notify_process_cpu_seconds",
        "CPU time (user + system) of this host's live notify processes, summed per role.",
        labels=["role"],
    )
    for role, directory in role_directories().items():
        usage = [process_usage(pid) for pid in live_pids(directory)]
        if not usage:
            continue  # no process of this role runs on this host now
        memory.add_metric([role], sum(u[0] for u in usage))
        cpu.add_metric([role], sum(u[1] for u in usage))
    yield memory
    yield cpu


def _build() -> Iterable[Metric]:
    from notify_project import __version__

    info = GaugeMetricFamily("notify_build_info", "The running version.", labels=["version"])
    info.add_metric([__version__], 1)
    yield info


class StateCollector:
    """The gauges above, read at collection; a reader that fails is logged and skipped (the
    rest of the scrape still answers)."""

    def collect(self) -> Iterable[Metric]:
        for read in (_deliveries, _providers, _queues, _processes, _build, *readers):
            try:
                yield from list(read())
            except Exception:  # noqa: BLE001  (one source down must not empty the scrape)
                log.warning("metrics: %s failed", read.__name__, exc_info=True)
