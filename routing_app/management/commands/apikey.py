"""``manage.py apikey create NAME [--scopes ingest,tokens] [--sources ...] [--topics ...]``,
``apikey list``, ``apikey revoke NAME``. The raw key is printed once, at creation."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from routing_app.models import ApiKey


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Command(BaseCommand):
    help = "Create, list and revoke API keys."

    def add_arguments(self, parser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="create a key and print it once")
        create.add_argument("name")
        create.add_argument("--scopes", default="ingest", help="comma-separated: ingest,tokens")
        create.add_argument("--sources", default="", help="allowed sources, comma-separated")
        create.add_argument(
            "--topics", default="", help="allowed topic patterns, comma-separated (alerts.*,k8s.#)"
        )
        create.add_argument("--rate", default="", help="requests per period, e.g. 100/s")
        actions.add_parser("list", help="list keys (never the raw keys)")
        revoke = actions.add_parser("revoke", help="revoke a key by name")
        revoke.add_argument("name")

    def handle(self, *args, action: str, **options) -> None:
        getattr(self, f"_{action}")(**options)

    def _create(self, name: str, scopes: str, sources: str, topics: str, rate: str, **_) -> None:
        if ApiKey.objects.filter(name=name).exists():
            raise CommandError(f"an API key named {name!r} exists; pick another name")
        key = ApiKey(
            name=name,
            scopes=_csv(scopes),
            allowed_sources=_csv(sources),
            allowed_topics="\n".join(_csv(topics)),
            rate=rate,
        )
        raw = key.set_new_key()
        try:
            key.full_clean()
        except ValidationError as exc:
            problems = [f"{field}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items()]
            raise CommandError("; ".join(problems)) from None
        key.save()
        self.stderr.write(f"Created API key {name!r}. Store it now; it is not shown again:")
        self.stdout.write(raw)

    def _list(self, **_) -> None:
        for key in ApiKey.objects.order_by("name"):
            state = "revoked" if key.revoked else "active"
            used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
            self.stdout.write(
                f"{key.name}\t{key.prefix}\t{state}\tscopes={','.join(key.scopes) or '-'}"
                f"\tsources={','.join(key.allowed_sources) or 'all'}"
                f"\ttopics={','.join(key.topic_patterns()) or 'all'}\tlast used {used}"
            )

    def _revoke(self, name: str, **_) -> None:
        try:
            key = ApiKey.objects.get(name=name)
        except ApiKey.DoesNotExist:
            raise CommandError(f"no API key named {name!r}") from None
        if key.revoked:
            self.stdout.write(f"{name} was already revoked")
            return
        key.revoked = True
        key.save(update_fields=["revoked"])  # save(): the signal drops this process's cache entry
        self.stdout.write(f"revoked {name}; other processes stop accepting it within seconds")
