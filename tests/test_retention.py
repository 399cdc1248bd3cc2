"""Retention trimming: a topic keeps its newest N notifications and those newer than T days,
by hand (``trim_topics``) and on Celery beat's schedule (``trim_retention_all``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from notify_project.celery import app as celery_app
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Notification, Topic
from routing_app.tasks import trim_retention_all


def post(topic: str, count: int) -> None:
    ingest([NotificationIn(topic=topic, event="tick", data={"n": n}) for n in range(count)])


def stored_seqs(topic: str) -> list[int]:
    return list(
        Notification.objects.filter(topic__name=topic).order_by("seq").values_list("seq", flat=True)
    )


@pytest.mark.django_db
def test_newest_n_are_kept():
    Topic.objects.create(name="alerts.k8s", retention_count=3, retention_days=0)
    post("alerts.k8s", 5)
    assert trim_retention_all() == 2
    assert stored_seqs("alerts.k8s") == [3, 4, 5]
    assert trim_retention_all() == 0, "a second run finds nothing to delete"
    post("alerts.k8s", 1)
    trim_retention_all()
    assert stored_seqs("alerts.k8s") == [4, 5, 6], "seq keeps counting after a trim"


@pytest.mark.django_db
def test_older_than_retention_days_are_removed():
    Topic.objects.create(name="system.health", retention_count=0, retention_days=1)
    post("system.health", 4)
    two_days_ago = timezone.now() - timedelta(days=2)
    Notification.objects.filter(seq__in=[1, 2]).update(created_at=two_days_ago)
    assert trim_retention_all() == 2
    assert stored_seqs("system.health") == [3, 4]


@pytest.mark.django_db
def test_topics_without_limits_keep_everything_and_others_are_trimmed_independently():
    Topic.objects.create(name="audit.log", retention_count=0, retention_days=0)
    Topic.objects.create(name="alerts.disk", retention_count=1, retention_days=0)
    post("audit.log", 3)
    post("alerts.disk", 3)
    trim_retention_all()
    assert stored_seqs("audit.log") == [1, 2, 3]
    assert stored_seqs("alerts.disk") == [3]


@pytest.mark.django_db
def test_trim_topics_command_trims_named_topics_and_reports(capsys):
    Topic.objects.create(name="alerts.k8s", retention_count=2, retention_days=0)
    Topic.objects.create(name="alerts.disk", retention_count=2, retention_days=0)
    post("alerts.k8s", 4)
    post("alerts.disk", 4)
    call_command("trim_topics", "alerts.k8s")
    out = capsys.readouterr().out
    assert "alerts.k8s: deleted 2" in out and "Deleted 2 notification(s)" in out
    assert stored_seqs("alerts.k8s") == [3, 4]
    assert stored_seqs("alerts.disk") == [1, 2, 3, 4]
    with pytest.raises(CommandError, match="no such topic: nope"):
        call_command("trim_topics", "nope")


def test_beat_schedules_a_registered_trim_task():
    celery_app.loader.import_default_modules()
    entry = settings.CELERY_BEAT_SCHEDULE["trim-retention"]
    assert entry["task"] in celery_app.tasks
    assert celery_app.tasks[entry["task"]].name == trim_retention_all.name
