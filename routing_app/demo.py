"""Demo data for trying the system: an admin, an API key, one channel of each kind, two routes,
three topics with a few notifications. ``install()`` is idempotent: running it again changes
nothing that is already there.

Only the hash of an API key is stored, so the raw demo key is kept in a gitignored file
(``.demo-api-key``) and reused while its hash still matches the ``demo`` key's row; otherwise
(first run, another database, a revoked or rotated key) a new key is made and the file rewritten.

The admin's published password ``admin`` is for a server bound to loopback only: ``demo --host``
and ``serve --host`` pass the bind address, and bound elsewhere the admin gets a random password,
printed once.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from .ingest import NotificationIn, ingest
from .models import ApiKey, Channel, Provider, Route, Topic

ADMIN_USERNAME = "admin"
ADMIN_EMAIL = "admin@example.com"
API_KEY_NAME = "demo"
DEFAULT_KEY_FILE = Path(settings.BASE_DIR) / ".demo-api-key"
# The embedded default, published here: refused with DEBUG off, and only kept by a server bound
# to loopback (``admin_login_for``).
INSECURE_DEMO_PASSWORD = "admin"  # noqa: S105
LOOPBACK = "127.0.0.1"
GENERATED_PASSWORD_BYTES = 12  # 16 URL-safe characters

CHANNELS = [
    ("websocket", Channel.Kind.WEBSOCKET),
    ("phoenix", Channel.Kind.PHOENIX),
    ("sse", Channel.Kind.SSE),
    ("pubsub", Channel.Kind.PUBSUB),
    ("email", Channel.Kind.EMAIL),
    ("sms", Channel.Kind.SMS),
    ("webhook", Channel.Kind.WEBHOOK),
]
REALTIME = ["websocket", "phoenix", "sse", "pubsub"]
# The demo prints its emails to the server log; point the provider at an SMTP relay in admin.
EMAIL_URL = "console://"

TOPICS = [
    ("alerts.k8s", "Kubernetes alerts"),
    ("reverse_flow:cluster-a", "State of cluster-a; joiners receive it and may ask for an update"),
    ("system.health", "Health of the notify system itself (staff only)"),
]
NOTIFICATIONS = [
    NotificationIn(
        topic="alerts.k8s",
        event="pod.crashloop",
        severity="error",
        source="k8s",
        data={"namespace": "prod", "pod": "api-7d9f", "reason": "CrashLoopBackOff", "count": 5},
        idempotency_key="demo-1",
    ),
    NotificationIn(
        topic="alerts.k8s",
        event="node.pressure",
        severity="warning",
        source="k8s",
        data={"node": "node-2", "condition": "MemoryPressure"},
        idempotency_key="demo-2",
    ),
    NotificationIn(
        topic="reverse_flow:cluster-a",
        event="state",
        source="workflow",
        data={"nodes": 3, "ready": 3, "version": "1.31.2"},
        idempotency_key="demo-3",
    ),
    NotificationIn(
        topic="system.health",
        event="started",
        source="system",
        data={"message": "demo data installed"},
        idempotency_key="demo-4",
    ),
]


@dataclass
class DemoLogin:
    username: str
    password: str | None  # None when the admin's password is no longer the demo password
    # The password is the published default, which only a server bound to loopback may keep.
    loopback_only: bool = False
    # The password was made just now, for a server bound elsewhere: shown this once.
    generated: bool = False


def is_loopback(host: str) -> bool:
    """True when a server bound to ``host`` is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or the wildcard "": it may be reachable from anywhere


def _demo_password(host: str) -> tuple[str, bool]:
    """(the password a new admin gets when served on ``host``, whether it was generated)."""
    password = settings.DEMO_ADMIN_PASSWORD
    if password != INSECURE_DEMO_PASSWORD:
        return password, False  # chosen by whoever set DEMO_ADMIN_PASSWORD
    if not settings.DEBUG:
        raise ImproperlyConfigured(
            "refusing to create admin/admin with DEBUG off: set DEMO_ADMIN_PASSWORD"
        )
    if is_loopback(host):
        return password, False
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES), True


def ensure_admin(host: str = LOOPBACK) -> DemoLogin:
    """Create the superuser ``admin`` unless it exists, for a server bound to ``host``.

    Its password is ``DEMO_ADMIN_PASSWORD``; when that is the published default ``admin``, only
    while ``host`` is loopback: bound elsewhere, a random one (``DemoLogin.generated``). An
    existing admin's password is never reset, except the published default on a host that is not
    loopback (``admin_login_for``). Raises ImproperlyConfigured for ``admin`` with DEBUG off.
    """
    User = get_user_model()
    if User.objects.filter(username=ADMIN_USERNAME).exists():
        return admin_login_for(host)
    password, generated = _demo_password(host)
    User.objects.create_superuser(ADMIN_USERNAME, ADMIN_EMAIL, password)
    insecure = password == INSECURE_DEMO_PASSWORD
    return DemoLogin(ADMIN_USERNAME, password, loopback_only=insecure, generated=generated)


def admin_login() -> DemoLogin:
    """The demo login as it stands in the database (password None if it was changed)."""
    user = get_user_model().objects.filter(username=ADMIN_USERNAME).first()
    if user is None:
        return DemoLogin(ADMIN_USERNAME, None)
    password = settings.DEMO_ADMIN_PASSWORD
    if not user.check_password(password):
        return DemoLogin(ADMIN_USERNAME, None)
    return DemoLogin(ADMIN_USERNAME, password, loopback_only=password == INSECURE_DEMO_PASSWORD)


def admin_login_for(host: str) -> DemoLogin:
    """The demo login for a server about to be bound to ``host``.

    The published ``admin`` / ``admin`` stays only while ``host`` is loopback; bound elsewhere,
    an admin still having it gets a random password, returned here once (``generated``) and
    never shown again.
    """
    login = admin_login()
    if not login.loopback_only or is_loopback(host):
        return login
    password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
    user = get_user_model().objects.get(username=ADMIN_USERNAME)
    user.set_password(password)
    user.save(update_fields=["password"])
    return DemoLogin(ADMIN_USERNAME, password, generated=True)


def current_api_key(key_file: Path = DEFAULT_KEY_FILE) -> str | None:
    """The raw demo key from ``key_file`` if it still opens the ``demo`` key's row, else None."""
    try:
        raw = key_file.read_text().strip()
    except FileNotFoundError:
        return None
    row = ApiKey.objects.filter(name=API_KEY_NAME, revoked=False).first()
    if row is None or row.hashed_key != ApiKey.hash(raw):
        return None
    return raw


def ensure_api_key(key_file: Path = DEFAULT_KEY_FILE) -> tuple[str, bool]:
    """Return (raw demo key, whether it is new). Makes a new key when the file's is unknown."""
    raw = current_api_key(key_file)
    if raw:
        return raw, False
    row = ApiKey.objects.filter(name=API_KEY_NAME).first() or ApiKey(
        name=API_KEY_NAME, scopes=list(ApiKey.SCOPES)
    )
    raw = row.set_new_key()
    row.revoked = False
    row.save()
    # Written owner-only: the file holds a working credential.
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(raw + "\n")
    return raw, True


def ensure_channels_and_routes() -> None:
    channels = {}
    for name, kind in CHANNELS:
        channels[name], _ = Channel.objects.get_or_create(name=name, defaults={"kind": kind})
    Provider.objects.get_or_create(
        channel=channels["email"], name="server-log", defaults={"url": EMAIL_URL}
    )
    realtime, created = Route.objects.get_or_create(
        name="everything to realtime", defaults={"topic_pattern": "#"}
    )
    if created:
        realtime.channels.set([channels[name] for name in REALTIME])
    alerts, created = Route.objects.get_or_create(
        name="alert errors to admin by email",
        defaults={"topic_pattern": "alerts.#", "min_severity": "error"},
    )
    if created:
        alerts.channels.set([channels["email"]])
        alerts.users.set(get_user_model().objects.filter(username=ADMIN_USERNAME))


def ensure_topics() -> None:
    for name, description in TOPICS:
        Topic.objects.get_or_create(name=name, defaults={"description": description})
    # Idempotency keys make a rerun return the first answers instead of adding rows.
    ingest(NOTIFICATIONS)


def install(key_file: Path = DEFAULT_KEY_FILE, host: str = LOOPBACK) -> tuple[DemoLogin, str, bool]:
    """Install everything for a server bound to ``host``; return (admin login, raw API key,
    whether the key is new)."""
    with transaction.atomic():
        login = ensure_admin(host)
        raw, new = ensure_api_key(key_file)
        ensure_channels_and_routes()
    ensure_topics()  # after the routes exist, so the demo alert is routed like any other
    return login, raw, new
