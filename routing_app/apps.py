from django.apps import AppConfig


class RoutingAppConfig(AppConfig):
    name = "routing_app"
    verbose_name = "Routing"

    def ready(self) -> None:
        from celery.signals import before_task_publish

        from . import router  # noqa: F401  (connects the route-cache invalidation signals)
        from .delivery import receipts  # noqa: F401  (connects django-anymail's tracking signal)
        from .metrics import instruments  # noqa: F401  (this process's metrics directory, first)
        from .metrics.state import stamp_sent_at

        before_task_publish.connect(stamp_sent_at, dispatch_uid="notify-queue-age")
        from .alerts import gauges  # noqa: F401  (adds notify_alerts to the state gauges)
        from .dashboard import ticks
        from .metrics import snapshot

        snapshot.register_after_publish(ticks.publish_tick)  # the dashboard's live tick
