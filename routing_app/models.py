"""The router's data: topics with durable streams, notifications, channels, providers, routes,
deliveries and API keys. Words as in DESIGN.md."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from .addresses import ADDRESS_KINDS, address_kind
from .topics import validate_topic_name, validate_topic_pattern

SOURCES = ["k8s", "alertmanager", "workflow", "user", "api", "system"]
SEVERITIES = ["debug", "info", "warning", "error", "critical"]
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
RATE_RE = re.compile(r"^(\d+)/(\d*)([smhd])\Z")


class Source(models.TextChoices):
    K8S = "k8s", "Kubernetes"
    ALERTMANAGER = "alertmanager", "Alertmanager"
    WORKFLOW = "workflow", "Workflow"
    USER = "user", "User action"
    API = "api", "API client"
    SYSTEM = "system", "System"


class Severity(models.TextChoices):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


def validate_rate(value: str) -> None:
    """A rate in django-ratelimit syntax: ``100/s``, ``10/m``, ``5/10s``."""
    if not RATE_RE.match(value or ""):
        raise ValidationError(
            f"rate {value!r} is not valid: write count/period, e.g. '100/s', '600/m', '5/10s'"
        )


def validate_json_object(value) -> None:
    if not isinstance(value, dict):
        raise ValidationError("must be a JSON object")
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > settings.MAX_MESSAGE_BYTES:
        raise ValidationError(
            f"is {size} bytes encoded; the limit is {settings.MAX_MESSAGE_BYTES} bytes"
        )


def default_retention_count() -> int:
    return settings.DEFAULT_RETENTION_COUNT


def default_retention_days() -> int:
    return settings.DEFAULT_RETENTION_DAYS


class Topic(models.Model):
    """An addressable stream. ``last_seq`` is taken under a row lock, so seqs are gap-free."""

    name = models.CharField(max_length=200, unique=True, validators=[validate_topic_name])
    description = models.CharField(max_length=300, blank=True)
    last_seq = models.BigIntegerField(default=0, editable=False)
    retention_count = models.PositiveIntegerField(
        default=default_retention_count,
        help_text="Keep at most this many of the newest notifications (0 = no count limit).",
    )
    retention_days = models.PositiveIntegerField(
        default=default_retention_days,
        help_text="Delete notifications older than this many days (0 = keep forever).",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Notification(models.Model):
    """One event, persisted once, with its per-topic sequence number."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    topic = models.ForeignKey(Topic, on_delete=models.CASCADE, related_name="notifications")
    seq = models.BigIntegerField()
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.API)
    event = models.CharField(max_length=100)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.INFO)
    data = models.JSONField(default=dict, validators=[validate_json_object])
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    # A hash of the request body, so a reused idempotency key with another body is refused.
    body_hash = models.CharField(max_length=64, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["topic", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["topic", "seq"], name="notification_topic_seq"),
            models.UniqueConstraint(
                fields=["source", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="notification_source_idempotency_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.topic_id}#{self.seq} {self.event}"

    def envelope(self, topic_name: str | None = None) -> dict:
        """The JSON object clients receive for this notification (sockets, SSE, pub/sub)."""
        return {
            "type": "notification",
            "topic": topic_name or self.topic.name,
            "seq": self.seq,
            "id": str(self.id),
            "event": self.event,
            "data": self.data,
            "severity": self.severity,
            "source": self.source,
            "ts": self.created_at.isoformat(),
        }


class Contact(models.Model):
    """Where a user can be reached by email and SMS."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="contact"
    )
    email = models.EmailField(blank=True, help_text="Defaults to the user's account email.")
    phone = models.CharField(max_length=20, blank=True, help_text="E.164, e.g. +4915112345678")

    def __str__(self) -> str:
        return f"contact of {self.user}"

    def clean(self) -> None:
        if self.phone and not re.match(r"^\+[1-9]\d{6,14}\Z", self.phone):
            raise ValidationError(
                {"phone": "use E.164 format: '+' then country code and number, e.g. +4915112345678"}
            )

    @property
    def email_address(self) -> str:
        return self.email or self.user.email


class Channel(models.Model):
    """A configured delivery medium an admin edits."""

    class Kind(models.TextChoices):
        WEBSOCKET = "websocket", "WebSocket (plain JSON)"
        PHOENIX = "phoenix", "Phoenix Channels socket"
        SSE = "sse", "Server-Sent Events"
        PUBSUB = "pubsub", "Redis pub/sub"
        EMAIL = "email", "Email"
        SMS = "sms", "SMS"
        WEBHOOK = "webhook", "Webhook"
        PUSH = "push", "Web Push"

    REALTIME_KINDS = {Kind.WEBSOCKET, Kind.PHOENIX, Kind.SSE, Kind.PUBSUB}
    # The kinds delivered per recipient through delivery/ (rows, providers, breakers).
    OUTBOUND_KINDS = {Kind.EMAIL, Kind.SMS, Kind.WEBHOOK, Kind.PUSH}
    # Options each kind accepts, with the type each must have.
    KIND_OPTIONS: dict[str, dict[str, type]] = {
        "websocket": {},
        "phoenix": {},
        "sse": {},
        "pubsub": {"channel_prefix": str},
        "email": {"from_email": str, "reply_to": str},
        "sms": {"from_number": str, "max_segments": int},
        "webhook": {"headers": dict},
        "push": {"ttl": int, "url": str},
    }

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    enabled = models.BooleanField(default=True)
    backup = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="backup_for",
        help_text="Used when this channel's providers are all broken or retries are exhausted.",
    )
    rate_limit = models.CharField(
        max_length=20, default="100/s", validators=[validate_rate], help_text="e.g. 100/s, 600/m"
    )
    # Circuit breaker (defaults from the seed report: 5 % failure rate, 1000 ms, 30 s, 80 %).
    breaker_failure_rate = models.PositiveSmallIntegerField(
        "failure rate %", default=5, validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    breaker_window_s = models.PositiveIntegerField(
        "window (s)", default=60, validators=[MinValueValidator(1)]
    )
    breaker_minimum_calls = models.PositiveIntegerField(
        "minimum calls", default=20, validators=[MinValueValidator(1)]
    )
    breaker_call_timeout_ms = models.PositiveIntegerField(
        "call timeout (ms)", default=1000, validators=[MinValueValidator(1)]
    )
    breaker_open_s = models.PositiveIntegerField(
        "open duration (s)", default=30, validators=[MinValueValidator(1)]
    )
    breaker_half_open_calls = models.PositiveSmallIntegerField(
        "half-open trial calls", default=10, validators=[MinValueValidator(1)]
    )
    breaker_half_open_success = models.PositiveSmallIntegerField(
        "half-open success % required",
        default=80,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
    )
    breaker_slow_call_ms = models.PositiveIntegerField(
        "slow call (ms)",
        default=500,
        validators=[MinValueValidator(1)],
        help_text="A call that takes longer than this counts as slow.",
    )
    breaker_slow_rate = models.PositiveSmallIntegerField(
        "slow-call rate %", default=50, validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    breaker_open_max_s = models.PositiveIntegerField(
        "longest open duration (s)",
        default=0,
        help_text="Each re-open doubles the open duration up to this; 0 = never grows.",
    )
    max_attempts = models.PositiveSmallIntegerField(
        default=5,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Tries per delivery before it is dead (a try may call several providers).",
    )
    retry_backoff_s = models.PositiveIntegerField(
        "retry backoff (s)",
        default=2,
        validators=[MinValueValidator(1)],
        help_text="Base of the exponential backoff between tries (full jitter).",
    )
    retry_backoff_max_s = models.PositiveIntegerField(
        "longest retry backoff (s)", default=600, validators=[MinValueValidator(1)]
    )
    max_message_bytes = models.PositiveIntegerField(
        default=64 * 1024, validators=[MinValueValidator(1), MaxValueValidator(64 * 1024)]
    )
    options = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    @property
    def is_realtime(self) -> bool:
        return self.kind in self.REALTIME_KINDS

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if not isinstance(self.options, dict):
            errors["options"] = "options must be a JSON object"
        else:
            allowed = self.KIND_OPTIONS.get(self.kind, {})
            for key, value in self.options.items():
                if key not in allowed:
                    names = ", ".join(sorted(allowed)) or "none"
                    errors["options"] = f"{key!r} is not an option of {self.kind}; allowed: {names}"
                elif not isinstance(value, allowed[key]):
                    errors["options"] = f"{key!r} must be a {allowed[key].__name__}"
        seen = {self.pk} if self.pk else set()
        backup = self.backup
        while backup is not None:
            if backup.pk in seen or backup.pk == self.pk:
                errors["backup"] = (
                    "backup channels form a cycle: pick a channel that does not lead back"
                )
                break
            seen.add(backup.pk)
            backup = backup.backup
        if self.backup_id and self.backup and self.backup.kind in self.REALTIME_KINDS:
            errors.setdefault("backup", "a backup must be an email, SMS, webhook or push channel")
        if errors:
            raise ValidationError(errors)


# addresses.py cannot import this module (this one imports it), so its kinds are plain strings:
# they must stay values of Channel.Kind.
assert set(ADDRESS_KINDS) <= set(Channel.Kind.values), "addresses.py names a kind Channel lacks"


class Provider(models.Model):
    """One concrete backend of a channel; the balancer picks among a channel's providers."""

    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="providers")
    name = models.CharField(max_length=100)
    url = models.CharField(
        max_length=500,
        help_text="smtp://user@host:port, smtps://, anymail://postmark, console://, "
        "https://sms-gateway/2010-04-01/Accounts/<sid>/Messages.json, the webhook URL, or "
        "webpush:// (each push goes to its subscription's endpoint).",
    )
    weight = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1)])
    enabled = models.BooleanField(default=True)
    credentials_env = models.CharField(
        "credentials environment variable",
        max_length=100,
        blank=True,
        validators=[],
        help_text="Name of the environment variable holding the secret (never the secret itself).",
    )
    rate_limit = models.CharField(
        max_length=20,
        blank=True,
        validators=[validate_rate],
        help_text="Calls allowed to this provider, e.g. 50/s; empty = only the channel's limit.",
    )
    options = models.JSONField(
        default=dict,
        blank=True,
        help_text='e.g. {"health_url": "https://gateway/health"} for an HTTP provider.',
    )
    disabled_reason = models.CharField(max_length=300, blank=True)
    healthy = models.BooleanField(default=True, editable=False)
    health_checked_at = models.DateTimeField(null=True, blank=True, editable=False)
    health_error = models.CharField(max_length=300, blank=True, editable=False)

    class Meta:
        ordering = ["channel", "name"]
        constraints = [
            models.UniqueConstraint(fields=["channel", "name"], name="provider_channel_name")
        ]

    def __str__(self) -> str:
        return f"{self.channel.name}/{self.name}"

    def clean(self) -> None:
        if self.credentials_env and not re.match(r"^[A-Z_][A-Z0-9_]*\Z", self.credentials_env):
            raise ValidationError(
                {"credentials_env": "give the NAME of an environment variable, e.g. SMTP_PASSWORD"}
            )
        schemes = {
            "email": ("smtp://", "smtps://", "anymail://", "console://"),
            "sms": ("http://", "https://", "console://"),
            "webhook": ("http://", "https://"),
            "push": ("webpush://",),
        }
        try:
            # The channel may be unsaved (added together with this provider in one admin form).
            kind = self.channel.kind
        except Channel.DoesNotExist:
            kind = None
        if kind in schemes and not self.url.startswith(schemes[kind]):
            raise ValidationError({"url": f"a {kind} provider URL starts with {schemes[kind]}"})
        problem = self._url_problem(kind)
        if problem:
            raise ValidationError({"url": problem})

    def _url_problem(self, kind: str | None) -> str | None:
        """What the transport would refuse in this URL at send time, said at save time."""
        # Imported here: the transports read these models' rows, never the other way at import.
        from .delivery.transports import DeliveryError
        from .delivery.transports.email import parse_smtp_url
        from .delivery.transports.sms import ACCOUNT_PATH_RE

        if kind == "email" and self.url.startswith(("smtp://", "smtps://")):
            try:
                target = parse_smtp_url(self.url)
            except DeliveryError as exc:
                return str(exc)
            if target.username and not self.credentials_env:
                return (
                    f"the URL logs in as {target.username!r}: name the environment variable "
                    "holding the password in 'credentials environment variable'"
                )
        if kind == "sms" and self.url.startswith(("http://", "https://")):
            if not ACCOUNT_PATH_RE.search(self.url.split("?", 1)[0]):
                return "an SMS gateway URL ends in /2010-04-01/Accounts/<sid>/Messages.json"
        return None


class Route(models.Model):
    """Which sources/topics/severities go to which channels and recipients."""

    name = models.CharField(max_length=100, unique=True)
    enabled = models.BooleanField(default=True)
    sources = models.JSONField(
        default=list, blank=True, help_text='Sources to match, e.g. ["k8s"]; empty = all.'
    )
    topic_pattern = models.CharField(
        max_length=200,
        default="#",
        validators=[validate_topic_pattern],
        help_text="'*' = one segment, '#' = any number of segments: alerts.*, k8s.prod.#",
    )
    min_severity = models.CharField(max_length=10, choices=Severity.choices, default="debug")
    channels = models.ManyToManyField(Channel, related_name="routes")
    users = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="+")
    groups = models.ManyToManyField(Group, blank=True, related_name="+")
    addresses = models.TextField(
        blank=True, help_text="Literal recipients, one per line: emails, +E.164 phones, URLs."
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if not isinstance(self.sources, list) or any(s not in SOURCES for s in self.sources):
            raise ValidationError({"sources": f"a list of sources from: {', '.join(SOURCES)}"})
        # The router skips an address it cannot classify; say so here rather than drop it.
        unknown = [a for a in self.literal_addresses() if address_kind(a) is None]
        if unknown:
            raise ValidationError(
                {
                    "addresses": f"{unknown[0]!r} is neither an email address, a +E.164 phone "
                    "number nor an http(s) URL"
                }
            )

    def literal_addresses(self) -> list[str]:
        return [line.strip() for line in self.addresses.splitlines() if line.strip()]


class ApiKey(models.Model):
    """A client's key. Only a SHA-256 of the secret is stored; the raw key is shown once.

    Raw key format: ``nk_<prefix>_<secret>``; the prefix finds the row, the hash proves the key.
    SHA-256 (not a slow password hash) is right here: the secret is 32 random bytes, so there is
    nothing to brute-force, and ingest checks a key on every request.
    """

    SCOPES = ("ingest", "tokens", "deliveries")

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=12, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list, help_text='e.g. ["ingest", "tokens"]')
    allowed_sources = models.JSONField(default=list, blank=True, help_text="empty = all sources")
    allowed_topics = models.TextField(
        blank=True, help_text="Topic patterns, one per line; empty = all topics."
    )
    rate = models.CharField(max_length=20, blank=True, validators=[validate_rate])
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked = models.BooleanField(default=False)

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def clean(self) -> None:
        if not isinstance(self.scopes, list) or any(s not in self.SCOPES for s in self.scopes):
            raise ValidationError({"scopes": f"a list from: {', '.join(self.SCOPES)}"})
        if not isinstance(self.allowed_sources, list) or any(
            s not in SOURCES for s in self.allowed_sources
        ):
            raise ValidationError({"allowed_sources": f"a list from: {', '.join(SOURCES)}"})
        for pattern in self.topic_patterns():
            try:
                validate_topic_pattern(pattern)
            except ValidationError as exc:
                raise ValidationError({"allowed_topics": exc.messages}) from None

    def topic_patterns(self) -> list[str]:
        return [line.strip() for line in self.allowed_topics.splitlines() if line.strip()]

    @staticmethod
    def hash(raw_secret: str) -> str:
        return hashlib.sha256(raw_secret.encode()).hexdigest()

    def set_new_key(self) -> str:
        """Generate a new key, store its hash, return the raw key (to show once)."""
        self.prefix = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        raw = f"nk_{self.prefix}_{secret}"
        self.hashed_key = self.hash(raw)
        return raw


# Deliveries, their attempts and the providers' breaker states live in delivery/models.py.
from .alerts.models import Alert, AlertRule, Silence  # noqa: E402
from .delivery.models import Attempt, BreakerState, Delivery  # noqa: E402
from .push.models import PushSubscription  # noqa: E402

__all__ = [
    "Alert",
    "AlertRule",
    "ApiKey",
    "Attempt",
    "BreakerState",
    "Channel",
    "Contact",
    "Delivery",
    "Notification",
    "Provider",
    "PushSubscription",
    "Route",
    "Silence",
    "Topic",
]
