"""``manage.py breaker status [PROVIDER]``, ``breaker reset PROVIDER``, ``breaker open PROVIDER``,
``breaker disable PROVIDER``: a provider's circuit breaker from a shell. PROVIDER is
``channel/name``, a provider's name (when only one has it) or its id."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from routing_app.delivery import transitions
from routing_app.delivery.breaker import BreakerConfig, breakers_from_settings
from routing_app.models import Channel, Provider


def find_provider(spec: str) -> Provider:
    providers = Provider.objects.select_related("channel")
    if spec.isdigit():
        matches = list(providers.filter(pk=int(spec)))
    elif "/" in spec:
        channel, _, name = spec.partition("/")
        matches = list(providers.filter(channel__name=channel, name=name))
    else:
        matches = list(providers.filter(name=spec))
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(str(p) for p in providers) or "none"
    if matches:
        raise CommandError(f"{spec!r} names several providers; write channel/name: {known}")
    raise CommandError(f"no provider {spec!r}; providers: {known}")


class Command(BaseCommand):
    help = "Show, reset, force open or disable providers' circuit breakers."

    def add_arguments(self, parser) -> None:
        parser.add_argument("action", choices=["status", "reset", "open", "disable"])
        parser.add_argument("provider", nargs="?", help="channel/name, name or id")

    def handle(self, *args, action: str, provider: str | None, **options) -> None:
        if action == "status":
            targets = (
                [find_provider(provider)]
                if provider
                else list(
                    Provider.objects.select_related("channel").filter(
                        channel__kind__in=Channel.OUTBOUND_KINDS
                    )
                )
            )
            breakers = breakers_from_settings()
            for p in targets:
                s = breakers.snapshot(p.pk, BreakerConfig.for_channel(p.channel))
                self.stdout.write(
                    f"{str(p):<30} {s.state:<11} calls {s.calls:<5} failure "
                    f"{s.failure_rate:5.1f} %  slow {s.slow_rate:5.1f} %"
                    f"{'  healthy' if p.healthy else '  UNHEALTHY: ' + p.health_error}"
                )
            return
        if not provider:
            raise CommandError(f"say which provider: manage.py breaker {action} channel/name")
        target = find_provider(provider)
        snapshot = transitions.control(target, action)
        self.stdout.write(f"{target}: breaker now {snapshot.state}")
