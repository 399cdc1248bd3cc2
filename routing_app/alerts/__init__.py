"""Alert rules over the host-merged metrics (``routing_app/metrics``): rules, the alerts they
raise, silences. Models in ``models``; evaluated by a periodic task (in-process in the embedded
mode); firing and resolved alerts are notifications on ``system.alerts.<rule>`` through the
router."""
