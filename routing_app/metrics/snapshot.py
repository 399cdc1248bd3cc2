"""Each host's merged figures, every ``METRICS_SNAPSHOT_S``: the dashboard's charts and the alert
rules read these, never the per-process files of other hosts.

One process per host publishes (it holds a short Redis lease named after the host): one write
per host per interval (``SET`` of the latest, ``RPUSH`` + ``LTRIM`` of the history), never one
per observation. Without Redis (the embedded mode) the history is kept in this process.

A snapshot is ``{"host", "at", "samples": [[name, {labels}, value], ...]}`` with the samples of
every family as Prometheus exports them (counters' ``_total``, histograms' ``_bucket`` with
``le``, ``_sum``, ``_count``); ``figures.py`` turns two of them into rates and quantiles.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from django.conf import settings

log = logging.getLogger(__name__)

_local_history: collections.deque = collections.deque()
_publisher: threading.Thread | None = None
_publisher_lock = threading.Lock()
_after_publish: list[Callable[[], None]] = []


def collect() -> dict:
    """This host's snapshot now (every process's metrics summed, and the state gauges)."""
    from .exposition import REGISTRY

    samples = []
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # creation timestamps: not figures
            samples.append([sample.name, sample.labels, sample.value])
    return {"host": settings.METRICS_HOST, "at": time.time(), "samples": samples}


def _keep() -> int:
    return settings.METRICS_HISTORY_S // settings.METRICS_SNAPSHOT_S + 1


def _key(kind: str, host: str = "") -> str:
    return f"{settings.REDIS_PREFIX}:metrics:{kind}" + (f":{host}" if host else "")


def publish(snap: dict) -> None:
    """Store ``snap`` as its host's latest and append it to the host's history."""
    if not settings.REDIS_URL:
        _local_history.append(snap)
        while len(_local_history) > _keep():
            _local_history.popleft()
        return
    from ..pubsub import sync_redis

    data = json.dumps(snap, separators=(",", ":"))
    host = snap["host"]
    pipe = sync_redis().pipeline(transaction=False)
    pipe.set(_key("latest", host), data, ex=3 * settings.METRICS_SNAPSHOT_S)
    pipe.rpush(_key("history", host), data)
    pipe.ltrim(_key("history", host), -_keep(), -1)
    pipe.expire(_key("history", host), settings.METRICS_HISTORY_S * 2)
    pipe.sadd(_key("hosts"), host)
    pipe.execute()


def history(seconds: float | None = None) -> dict[str, list[dict]]:
    """host -> its snapshots of the last ``seconds`` (default: all kept), oldest first."""
    since = time.time() - (seconds or settings.METRICS_HISTORY_S)
    if not settings.REDIS_URL:
        return {settings.METRICS_HOST: [s for s in _local_history if s["at"] >= since]}
    from ..pubsub import sync_redis

    client = sync_redis()
    # Only the newest entries can be that recent: one per interval, and a few to spare.
    first = -(int((seconds or settings.METRICS_HISTORY_S) / settings.METRICS_SNAPSHOT_S) + 3)
    out = {}
    for raw_host in client.smembers(_key("hosts")):
        host = raw_host.decode()
        snaps = [json.loads(x) for x in client.lrange(_key("history", host), first, -1)]
        kept = [s for s in snaps if s["at"] >= since]
        if kept:
            out[host] = kept
        elif not client.exists(_key("history", host)):
            client.srem(_key("hosts"), host)  # a host gone for longer than the history
    return out


def _lease() -> bool:
    """Whether this process publishes for its host (held for two intervals, renewed)."""
    if not settings.REDIS_URL:
        return True
    from ..pubsub import sync_redis

    client = sync_redis()
    key = _key("publisher", settings.METRICS_HOST)
    me = f"{os.getpid()}"
    ttl = 2 * settings.METRICS_SNAPSHOT_S
    if client.set(key, me, nx=True, ex=ttl):
        return True
    if client.get(key) == me.encode():
        client.expire(key, ttl)
        return True
    return False


def publish_once() -> bool:
    """Collect and publish if this process holds its host's lease; True when it published."""
    if not _lease():
        return False
    publish(collect())
    return True


def register_after_publish(hook: Callable[[], None]) -> None:
    """Call ``hook()`` in the publishing thread after each snapshot this process publishes (the
    dashboard's live tick). Once per hook; a hook's error is logged and the loop goes on."""
    if hook not in _after_publish:
        _after_publish.append(hook)


def _after(published: bool) -> None:
    if not published:
        return
    for hook in list(_after_publish):
        try:
            hook()
        except Exception as exc:  # noqa: BLE001  (a hook's trouble must not stop the snapshots)
            log.warning("after-snapshot hook %s failed: %s", getattr(hook, "__name__", hook), exc)


def _run() -> None:
    interval = settings.METRICS_SNAPSHOT_S
    while True:
        started = time.monotonic()
        published = False
        try:
            published = publish_once()
        except Exception as exc:  # noqa: BLE001  (Redis or the database away: try next time)
            log.warning("metrics snapshot not published: %s", exc)
        _after(published)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def start_publisher() -> None:
    """Start this process's publishing thread (once; a forked child starts its own)."""
    global _publisher
    with _publisher_lock:
        if _publisher is None or not _publisher.is_alive():
            _publisher = threading.Thread(target=_run, name="metrics-snapshot", daemon=True)
            _publisher.start()
