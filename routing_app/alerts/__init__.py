"""Alert rules over the host-merged metrics (``routing_app/metrics``): rules, the alerts they
raise, silences. Firing and resolved alerts are notifications on ``system.alerts.<rule>``
through the router.

- ``models``: AlertRule, Alert, Silence (imported by ``routing_app.models``);
- ``figures``: a rule's figure per scope between two merged snapshots;
- ``evaluation``: ``evaluate(now)``, the state machine (pending, firing, resolved) under one
  evaluator's lock;
- ``notices``: the ``alert.firing`` / ``alert.resolved`` notifications and the silences that
  hold them back;
- ``service``: what the dashboard reads (firing, pending, recently resolved, silences) and
  ``silence(...)``;
- ``gauges``: ``notify_alerts{rule,state}`` among the state gauges;
- ``tasks``: the Celery beat task (the embedded loop calls ``evaluate`` itself);
- ``admin``: rules, alerts, silences.
"""
