"""The Celery edge of the alert rules: one periodic task (``CELERY_BEAT_SCHEDULE``, every
``ALERT_EVALUATE_S``); the embedded mode's loop calls ``evaluate`` itself."""

from __future__ import annotations

from celery import shared_task

from .evaluation import evaluate as evaluate_rules


@shared_task(name="routing_app.alerts.evaluate", ignore_result=True)
def evaluate() -> int:
    """Evaluate every enabled rule now; return how many alerts changed. A run queued behind
    another finds the evaluator's lock taken or its figures unchanged: harmless."""
    return len(evaluate_rules())
