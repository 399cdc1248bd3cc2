"""The dashboard's live tick: the newest chart point on topic ``system.dashboard``.

After each snapshot it publishes (``snapshot.register_after_publish``, from the app's ``ready``),
a process that holds the deployment's ticker lease computes the newest point from every host's
snapshots (``charts.latest_point``) and hands it to the router as an ephemeral event
``dashboard.tick`` (``router.publish_ephemeral``). So there is one tick per interval whatever
the number of hosts and processes, and the pages' EventSource receives it as an SSE event named
``dashboard.tick`` with no id.

What a page receives (SSE; the plain socket gets the same ``event`` frame)::

    event: dashboard.tick
    data: {"type":"event","topic":"system.dashboard","event":"dashboard.tick","payload":
           {"at": <epoch s>, <every field of metrics.figures.overview>}}

``payload`` is exactly a point of ``charts.history_points`` (the newest), so the page appends it
to the charts it drew at load.

Why ephemeral and not a stored notification: a tick is stale a moment later, and the page draws
the past from ``snapshot.history()`` at load; storing 17 280 ticks a day in the durable stream
(and trimming them) would buy a resume nobody needs. The price, accepted: a page that was
disconnected misses the ticks of that time until it reloads (its chart then has a gap).
``system.#`` is staff only by the default topic rules, so only staff can follow the topic.

Accepted race (written down): when the lease holder dies, no tick goes out until its lease
expires (two intervals) and another process takes it.
"""

from __future__ import annotations

import logging
import os

from django.conf import settings

from .. import router
from . import charts

log = logging.getLogger(__name__)

TOPIC = "system.dashboard"
EVENT = "dashboard.tick"


def _lease() -> bool:
    """Whether this process is the deployment's ticker (held for two intervals, renewed)."""
    if not settings.REDIS_URL:
        return True
    from ..pubsub import sync_redis

    client = sync_redis()
    key = f"{settings.REDIS_PREFIX}:dashboard:ticker"
    me = f"{settings.METRICS_HOST}:{os.getpid()}".encode()
    ttl = 2 * settings.METRICS_SNAPSHOT_S
    if client.set(key, me, nx=True, ex=ttl):
        return True
    if client.get(key) == me:
        client.expire(key, ttl)
        return True
    return False


def publish_tick() -> bool:
    """Publish the newest point if this process is the ticker; True when a tick went out.
    Raises Redis' errors (the snapshot loop logs them and tries again next interval)."""
    if not _lease():
        return False
    point = charts.latest_point()
    if point is None:
        return False
    return router.publish_ephemeral(TOPIC, EVENT, point)
