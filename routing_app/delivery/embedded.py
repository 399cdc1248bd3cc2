"""The embedded mode's worker: without Redis there is no Celery broker, so the server process
runs the same delivery code on a background thread: ``submit``-ted ids at their time, the sweeper
every ``SWEEP_INTERVAL_S``, the health checks every ``HEALTH_CHECK_INTERVAL_S`` and the alert
rules every ``ALERT_EVALUATE_S``. ``make run`` delivers like production, on one process.

Started on the first ``submit`` or by ``start()`` (the ASGI application calls it, so rows left
from a previous run are swept at start-up).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)

_lock = threading.Condition()
_queue: list[tuple[float, int, list[int]]] = []  # (due monotonic, order, ids)
_order = itertools.count()
_thread: threading.Thread | None = None


def submit(ids: list[int], *, delay_s: float = 0.0) -> None:
    start()
    with _lock:
        heapq.heappush(_queue, (time.monotonic() + delay_s, next(_order), ids))
        _lock.notify()


def queue_state() -> tuple[int, float]:
    """(batches waiting, seconds the most overdue one has waited past its time)."""
    with _lock:
        if not _queue:
            return 0, 0.0
        return len(_queue), max(0.0, time.monotonic() - _queue[0][0])


def start() -> None:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="embedded-delivery", daemon=True)
            _thread.start()


def _run() -> None:
    from ..alerts.evaluation import evaluate
    from . import health, service, sweeper

    next_sweep = next_health = next_alerts = time.monotonic()
    while True:
        now = time.monotonic()
        jobs = []
        with _lock:
            while _queue and _queue[0][0] <= now:
                jobs.append(heapq.heappop(_queue)[2])
            if not jobs and now < min(next_sweep, next_health, next_alerts):
                wake = min(next_sweep, next_health, next_alerts)
                wake = min(wake, _queue[0][0]) if _queue else wake
                _lock.wait(timeout=wake - now)
                continue
        close_old_connections()
        for ids in jobs:
            _guarded(service.deliver, ids)
        if now >= next_sweep:
            _guarded(sweeper.sweep)
            next_sweep = now + settings.SWEEP_INTERVAL_S
        if now >= next_health:
            _guarded(health.check_all)
            next_health = now + settings.HEALTH_CHECK_INTERVAL_S
        if now >= next_alerts:
            _guarded(evaluate)
            next_alerts = now + settings.ALERT_EVALUATE_S


def _guarded(run, *args) -> None:
    try:
        run(*args)
    except Exception:  # noqa: BLE001  (the loop must outlive one bad round; say which)
        log.exception("embedded delivery: %s failed", run.__qualname__)
