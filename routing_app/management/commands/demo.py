"""``manage.py demo``: install the demo admin, API key, channels, routes and topics (idempotent)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand

from routing_app import demo


class Command(BaseCommand):
    help = "Create demo data: admin user, API key, channels, routes, topics. Safe to rerun."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--key-file",
            type=Path,
            default=demo.DEFAULT_KEY_FILE,
            help="where the raw demo API key is kept (default: .demo-api-key, gitignored)",
        )

    def handle(self, *args, key_file: Path, **options) -> None:
        login, raw, new = demo.install(key_file)
        password = login.password or "(changed since the demo created it)"
        self.stdout.write(f"Admin login: {login.username} / {password}")
        state = "new" if new else "unchanged"
        self.stdout.write(f"API key ({state}, kept in {key_file}): {raw}")
        self.stdout.write(self.style.SUCCESS("Demo data is in place."))
