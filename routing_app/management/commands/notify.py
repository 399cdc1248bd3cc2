"""``manage.py notify send --topic T --event E [--data JSON] [--severity S] [--source S]``."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from routing_app.ingest import IngestError
from routing_app.models import SEVERITIES, SOURCES
from routing_app.notify_api import notify


class Command(BaseCommand):
    help = "Send a notification (stored, routed and published like one posted to the API)."

    def add_arguments(self, parser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        send = actions.add_parser("send", help="store and route one notification")
        send.add_argument("--topic", required=True, help="e.g. alerts.k8s or user:42")
        send.add_argument("--event", required=True, help="e.g. pod.crashloop")
        send.add_argument("--data", default="{}", help='a JSON object, e.g. \'{"pod": "web-1"}\'')
        send.add_argument("--severity", default="info", choices=SEVERITIES)
        send.add_argument("--source", default="system", choices=SOURCES)
        send.add_argument("--idempotency-key", default=None)

    def handle(self, *args, **options) -> None:
        try:
            data = json.loads(options["data"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--data is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CommandError('--data must be a JSON object, e.g. \'{"key": "value"}\'')
        try:
            result = notify(
                options["topic"],
                options["event"],
                data,
                severity=options["severity"],
                source=options["source"],
                idempotency_key=options["idempotency_key"],
            )
        except IngestError as exc:
            raise CommandError(str(exc)) from None
        state = "stored" if result.created else "already stored (same idempotency key)"
        self.stdout.write(f"{state}: topic {result.topic} seq {result.seq} id {result.id}")
