"""``manage.py deliveries retry --dead [--channel NAME]``: replay dead deliveries (after fixing
what killed them); ``deliveries status``: how many rows are in each status, per channel."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count

from routing_app.delivery import service
from routing_app.models import Channel, Delivery


class Command(BaseCommand):
    help = "Replay dead deliveries; count deliveries by status."

    def add_arguments(self, parser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        retry = actions.add_parser("retry", help="send dead deliveries again")
        retry.add_argument(
            "--dead", action="store_true", required=True, help="the dead ones (the only kind)"
        )
        retry.add_argument("--channel", help="only this channel's (its name)")
        actions.add_parser("status", help="deliveries per channel and status")

    def handle(self, *args, action: str, **options) -> None:
        getattr(self, f"_{action}")(**options)

    def _retry(self, channel: str | None, **_) -> None:
        rows = Delivery.objects.all()
        if channel:
            if not Channel.objects.filter(name=channel).exists():
                names = ", ".join(Channel.objects.values_list("name", flat=True)) or "none"
                raise CommandError(f"no channel named {channel!r}; channels: {names}")
            rows = rows.filter(channel__name=channel)
        count = service.replay(rows)
        self.stdout.write(f"{count} dead delivery(s) sent again.")

    def _status(self, **_) -> None:
        counts = (
            Delivery.objects.values("channel__name", "status")
            .annotate(n=Count("pk"))
            .order_by("channel__name", "status")
        )
        for row in counts:
            self.stdout.write(f"{row['channel__name']:<20} {row['status']:<10} {row['n']}")
