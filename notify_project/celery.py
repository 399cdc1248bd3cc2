"""The Celery app. With REDIS_URL it uses Redis as broker; embedded, tasks run eagerly."""

import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")

app = Celery("notify")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def _start_metrics_snapshots(**_kwargs) -> None:
    """A host that runs only workers publishes its figures too (one process per host does)."""
    from routing_app.metrics import snapshot

    snapshot.start_publisher()
