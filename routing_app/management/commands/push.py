"""``manage.py push keys``: a new VAPID key pair for Web Push, printed as the environment lines
to set (README, *Web Push*); ``manage.py push check``: whether the configured pair is usable."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from routing_app.push import vapid


class Command(BaseCommand):
    help = "Generate a VAPID key pair for Web Push (keys), or check the configured one (check)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("action", choices=["keys", "check"])

    def handle(self, *args, action: str, **options) -> None:
        if action == "keys":
            private, public = vapid.generate_keys()
            self.stdout.write(
                "# Web Push: put these in the environment of the web and worker processes.\n"
                "# The private key is a secret; the public key is the browser's\n"
                "# applicationServerKey (GET /api/v1/push/key serves it).\n"
                f"WEBPUSH_VAPID_PRIVATE_KEY={private}\n"
                f"WEBPUSH_VAPID_PUBLIC_KEY={public}\n"
                f"WEBPUSH_VAPID_SUBJECT={settings.WEBPUSH_VAPID_SUBJECT}"
            )
            return
        try:
            keys = vapid.keys()
        except vapid.NotConfigured as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"VAPID keys OK; applicationServerKey {keys.public_key}, subject {keys.subject}"
        )
