"""The Celery edge of delivery. Thin: each task calls one service function.

``deliver`` is at-least-once: late ack (the message is acknowledged after the task returns) and
``reject_on_worker_lost`` (a worker process killed mid-task puts the message back), which is safe
because the claim in ``service.deliver`` takes a row once; a message that keeps killing its
worker is bounded by the rows' own tries. Rows whose message is lost anyway are the sweeper's.
"""

from __future__ import annotations

from celery import shared_task

from . import health, service, sweeper


@shared_task(
    name="routing_app.delivery.deliver",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def deliver(ids: list[int]) -> int:
    """Try the due deliveries among ``ids``; return how many were claimed."""
    return len(service.deliver(ids))


@shared_task(name="routing_app.delivery.sweep", ignore_result=True)
def sweep() -> int:
    return sweeper.sweep().enqueued


@shared_task(name="routing_app.delivery.check_health", ignore_result=True)
def check_health() -> int:
    return sum(not ok for ok in health.check_all().values())
