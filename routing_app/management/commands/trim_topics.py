"""``manage.py trim_topics [NAME ...]``: delete notifications past their topic's retention.

Celery beat runs the same trimming on a schedule when Redis is configured; the embedded mode
has no beat, so run this by hand (or from cron) there.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from routing_app.models import Topic
from routing_app.stream_writes import trim_retention


class Command(BaseCommand):
    help = "Delete notifications older or further back than each topic's retention."

    def add_arguments(self, parser) -> None:
        parser.add_argument("names", nargs="*", help="topics to trim (default: every topic)")

    def handle(self, *args, names: list[str], **options) -> None:
        topics = Topic.objects.order_by("name")
        if names:
            topics = topics.filter(name__in=names)
            missing = sorted(set(names) - set(topics.values_list("name", flat=True)))
            if missing:
                raise CommandError(f"no such topic: {', '.join(missing)}")
        total = 0
        for topic in topics.iterator():
            deleted = trim_retention(topic)
            total += deleted
            if deleted or options["verbosity"] > 1:
                self.stdout.write(f"{topic.name}: deleted {deleted}")
        self.stdout.write(self.style.SUCCESS(f"Deleted {total} notification(s) past retention."))
