"""``manage.py demo``: install the demo admin, API key, channels, routes and topics (idempotent)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand

from routing_app import demo


def login_note(login: demo.DemoLogin) -> str:
    """What to tell about the demo password beside it (empty when nothing)."""
    if login.generated:
        return "  (random, as the server is not bound to loopback: shown this once)"
    if login.loopback_only:
        return "  (the published demo password: kept only while bound to loopback)"
    return ""


class Command(BaseCommand):
    help = "Create demo data: admin user, API key, channels, routes, topics. Safe to rerun."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--key-file",
            type=Path,
            default=demo.DEFAULT_KEY_FILE,
            help="where the raw demo API key is kept (default: .demo-api-key, gitignored)",
        )
        parser.add_argument(
            "--host",
            default=demo.LOOPBACK,
            help="the address the server will be bound to (default 127.0.0.1): the demo password "
            "'admin' is given only for a loopback address, a random one otherwise",
        )

    def handle(self, *args, key_file: Path, host: str, **options) -> None:
        login, raw, new = demo.install(key_file, host)
        password = login.password or "(changed since the demo created it)"
        self.stdout.write(f"Admin login: {login.username} / {password}{login_note(login)}")
        state = "new" if new else "unchanged"
        self.stdout.write(f"API key ({state}, kept in {key_file}): {raw}")
        self.stdout.write(self.style.SUCCESS("Demo data is in place."))
