"""The operators' dashboard at ``/dashboard/`` (staff only): server-rendered pages kept live over
notify's own SSE endpoint.

- ``charts``: the overview's chart points from the metrics snapshots (the last 15 minutes at page
  load) and the latest one (a tick);
- ``ticks``: once per ``METRICS_SNAPSHOT_S``, one process of the deployment puts the latest point
  on topic ``system.dashboard`` as an ephemeral event (never stored, see ``ticks``);
- ``realtime``: the seam through which the realtime edge shows its per-process subscriber counts
  and who is present (routing_app never imports channels_app);
- ``views``, ``forms``, ``urls``: the pages and their actions (breaker reset and force-open,
  replay, silences, the topic console's test publish).
"""
