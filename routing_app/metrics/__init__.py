"""Metrics of every process of a host, summed (prometheus-client's multiprocess mode).

- ``files``: the per-role directories of multiprocess files (wiped when a new run starts) and
  the collector that sums them for ``/metrics``, skipping the live gauges of dead processes;
- ``instruments``: every metric we record, with label children bound once for the hot paths
  (no-op stand-ins when ``METRICS_ENABLED`` is false); the realtime edge's recording sites are
  in ``channels_app/edge_metrics.py``;
- ``state``: gauges read when collected (deliveries by status, breakers, providers' health,
  Celery queues, memory and CPU per role, alerts, build);
- ``exposition``: the ``/metrics`` view (bearer ``METRICS_TOKEN`` or a staff session);
- ``snapshot``: each host's merged figures, published every ``METRICS_SNAPSHOT_S`` to Redis (or
  kept in-process in the embedded mode), and the last 15 minutes of them for the dashboard and
  the alert rules.

Names follow Prometheus' conventions: prefix ``notify_``, base units (seconds, bytes), ``_total``
on counters; topics are labelled by their first segment (``topic_namespace``), never by name.
"""
