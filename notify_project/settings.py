"""Settings for notify. The environment is read here and nowhere else.

Nothing set = the embedded default: SQLite, in-memory channel layer, tasks run in-process.
`DATABASE_URL` switches to Postgres, `REDIS_URL` switches on every shared-state backend.
Every variable is listed with a comment in `.env.example`.
"""

import os
import secrets
import sys
import tempfile
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from corsheaders.defaults import default_headers as cors_default_headers
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


# --- strict environment helpers -------------------------------------------------------------


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use true or false")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- core -----------------------------------------------------------------------------------


def local_secret_key(path: Path) -> str:
    """The signing key kept in ``path``, made (random, owner-only) on first use.

    Every process of one checkout reads the same file, so tokens minted by one are accepted by the
    others. Concurrent first starts are safe: the key is written to a file of its own, then linked
    to ``path``, which fails when another process linked first; that one's key is then read.
    """
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key
    try:
        fd, draft = tempfile.mkstemp(prefix=f"{path.name}.", dir=path.parent)  # mode 0600
    except OSError as exc:
        raise ImproperlyConfigured(
            f"cannot keep a signing key in {path} ({exc.strerror}): set SECRET_KEY, or "
            "SECRET_KEY_FILE to a file in a writable directory"
        ) from None
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(50) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first: its key is the key
    finally:
        os.unlink(draft)
    key = path.read_text().strip()
    if not key:
        raise ImproperlyConfigured(
            f"{path} is empty: delete it (a new key is made) or set SECRET_KEY"
        )
    return key


TESTING = "pytest" in sys.modules or env_bool("NOTIFY_TESTING", False)
DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY")
# Where the embedded default keeps the signing key it made (gitignored); never used with DEBUG off.
SECRET_KEY_FILE = Path(env_str("SECRET_KEY_FILE") or BASE_DIR / ".secret-key")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set and DEBUG is off: set SECRET_KEY to a long random string "
            "(python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        )
    SECRET_KEY = local_secret_key(SECRET_KEY_FILE)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
# Origins of browser apps (the Nuxt app) allowed to call the API, open SSE streams and WebSockets.
NOTIFY_ALLOWED_ORIGINS = env_list(
    "NOTIFY_ALLOWED_ORIGINS", ["http://localhost:3000", "http://127.0.0.1:3000"]
)
CORS_ALLOWED_ORIGINS = NOTIFY_ALLOWED_ORIGINS
CORS_ALLOW_CREDENTIALS = True
# django-cors-headers' defaults plus Last-Event-ID, which SSE clients built on fetch send on resume.
CORS_ALLOW_HEADERS = (*cors_default_headers, "last-event-id")
CSRF_TRUSTED_ORIGINS = NOTIFY_ALLOWED_ORIGINS

# HTTPS, as a deployment behind a TLS-terminating proxy sets it (docs/deployment.md); with these
# set as .env.example shows, `manage.py check --deploy` is clean. Cookies are secure-only whenever
# DEBUG is off; HSTS and the redirect are opt-in, because a host that is not HTTPS-only yet would
# be locked out by them.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# The header the proxy sets to the scheme the client used, e.g. X-Forwarded-Proto; unset: the
# connection's own scheme. Set it only behind a proxy that overwrites the header on every request.
_proxy_scheme_header = env_str("SECURE_PROXY_SSL_HEADER")
if _proxy_scheme_header:
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + _proxy_scheme_header.upper().replace("-", "_"),
        "https",
    )

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "channels",
    "django_eventstream",
    "anymail",
    "routing_app",
    "channels_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "notify_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "notify_project.wsgi.application"
ASGI_APPLICATION = "notify_project.asgi.application"

# --- database -------------------------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Fail fast when Postgres is down: ingest answers 503 instead of hanging.
        DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = 3
        # Django turns psycopg's prepared statements off for poolers; ingest's two hot statements
        # ask for them (stream_writes.py), nothing else does (Django's client-side cursors never
        # prepare). Off with DATABASE_PREPARED_STATEMENTS=false, e.g. behind an old PgBouncer.
        if env_bool("DATABASE_PREPARED_STATEMENTS", True):
            DATABASES["default"]["OPTIONS"]["prepare_threshold"] = 5
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            # SQLite serializes writers; wait for the lock instead of failing under concurrency.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    }
USING_POSTGRES = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- redis: channel layer, cache, celery, presence, limits -----------------------------------

REDIS_URL = env_str("REDIS_URL")
# Prefix of every Redis key and pub/sub channel we own (pub/sub ignores the database number, so
# two deployments or test runs sharing one Redis need different prefixes).
REDIS_PREFIX = env_str("REDIS_PREFIX", "notify")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
    # django-redis: atomic INCR, which django-ratelimit requires.
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
            "KEY_PREFIX": REDIS_PREFIX,
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # One process in the embedded mode: a process-local cache is the shared state.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    # LocMem's incr is guarded by a lock within the process; the embedded mode has one process.
    SILENCED_SYSTEM_CHECKS = ["django_ratelimit.E003", "django_ratelimit.W001"]

RATELIMIT_USE_CACHE = "default"
RATELIMIT_FAIL_OPEN = env_bool("RATELIMIT_FAIL_OPEN", False)

# --- outbound delivery (routing_app/delivery/) -------------------------------------------------

DELIVERY_BATCH = env_int("DELIVERY_BATCH", 50)  # ids per task; rows of a batch go out in parallel
# Concurrent provider calls per worker process (SQLite takes one writer at a time: fewer).
DELIVERY_THREADS = env_int("DELIVERY_THREADS", 16 if USING_POSTGRES else 4)
DELIVERY_MAX_COUNTDOWN_S = 600  # longer waits are left to the sweeper (see visibility_timeout)
SWEEP_INTERVAL_S = env_int("SWEEP_INTERVAL_S", 5)
SWEEP_BATCH = 5000  # due rows enqueued per sweep at most
SWEEP_PENDING_GRACE_S = env_int("SWEEP_PENDING_GRACE_S", 15)  # a pending row's task may be lost
# Beyond the call timeouts before a ``sending`` row counts as stuck (its worker died).
SWEEP_MARGIN_S = env_int("SWEEP_MARGIN_S", 10)
HEALTH_CHECK_INTERVAL_S = env_int("HEALTH_CHECK_INTERVAL_S", 10)
HEALTH_CHECK_TIMEOUT_S = 2
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "notify@localhost")
# django-anymail's tracking webhooks answer only with HTTP basic auth "user:password" set here.
ANYMAIL_WEBHOOK_SECRET = env_str("ANYMAIL_WEBHOOK_SECRET")
ANYMAIL = {"WEBHOOK_SECRET": ANYMAIL_WEBHOOK_SECRET} if ANYMAIL_WEBHOOK_SECRET else {}
if SWEEP_PENDING_GRACE_S < 2 * SWEEP_INTERVAL_S:
    raise ImproperlyConfigured("SWEEP_PENDING_GRACE_S must be at least twice SWEEP_INTERVAL_S")

# Celery: with Redis, a real broker; embedded, tasks run in-process at enqueue time.
# CELERY_BROKER_URL may name another Redis than REDIS_URL (the default).
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
# At least once (routing_app/delivery/tasks.py): ack after the task returns, put the message back
# when a worker process dies mid-task, stop tasks whose ack can no longer reach a lost broker.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A publish must not hold an ingest answer while the broker is down: fail fast, the sweeper
# enqueues the rows later.
CELERY_TASK_PUBLISH_RETRY = False
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Above the longest countdown we send (DELIVERY_MAX_COUNTDOWN_S), else Redis redelivers
    # messages still waiting; longer waits are the sweeper's, from next_attempt_at.
    "visibility_timeout": 3600,
    "global_keyprefix": f"{REDIS_PREFIX}:",
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
}
CELERY_TASK_SERIALIZER = "json"
# Periodic tasks; run exactly one `celery beat` per deployment. Retention age is in days, so an
# hourly trim keeps every topic within an hour of its limits. A crontab, not an interval: a
# restarted beat (fresh schedule file) would push an interval's first run back a whole interval.
CELERY_BEAT_SCHEDULE = {
    "trim-retention": {
        "task": "routing_app.tasks.trim_retention_all",
        "schedule": crontab(minute=7),  # every hour at :07
    },
    "sweep-deliveries": {"task": "routing_app.delivery.sweep", "schedule": SWEEP_INTERVAL_S},
    "check-provider-health": {
        "task": "routing_app.delivery.check_health",
        "schedule": HEALTH_CHECK_INTERVAL_S,
    },
}

# --- notify itself ------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 64 * 1024  # the seed report's message size limit
# How production runs uvicorn for these sockets (manage.py serve, bench/, the tests' servers):
# - websockets-sansio (uvicorn's default with `websockets` installed): its send() completes without
#   suspending whenever the transport can take the frame, which the hub's immediate fanout uses;
# - max size a little above ours: a frame just over 64 KB reaches the app and gets 1009 with a
#   reason; a much larger one is cut by uvicorn itself (also 1009) before it is buffered whole;
# - permessage-deflate on (uvicorn's default, stated so that it stays on).
UVICORN_WS_ARGS = (
    "--ws=websockets-sansio",
    f"--ws-max-size={MAX_MESSAGE_BYTES + 1024}",
    "--ws-per-message-deflate=true",
)
# Request deadlines of the server's HTTP protocol (notify_project/uvicorn_protocols.py): a client
# on a slow mobile link sends a head in well under a second, so 10 s is generous and bounds how
# long a trickling client holds a connection; the largest body ingest accepts (a batch) takes a
# fraction of 30 s on any link that can use the API at all.
REQUEST_HEAD_TIMEOUT_S = env_int("REQUEST_HEAD_TIMEOUT_S", 10)
REQUEST_BODY_TIMEOUT_S = env_int("REQUEST_BODY_TIMEOUT_S", 30)
if min(REQUEST_HEAD_TIMEOUT_S, REQUEST_BODY_TIMEOUT_S) < 1:
    raise ImproperlyConfigured("REQUEST_HEAD_TIMEOUT_S and REQUEST_BODY_TIMEOUT_S must be >= 1")
INGEST_RATE = env_str("INGEST_RATE", "6000/s")  # per API key; django-ratelimit syntax
# A post not committed this many seconds after it arrived answers 503 (nothing stored) and its
# transaction rolls back: a healthy commit takes under 0.1 s (bench/ingest.py, p99 under load),
# and 4 s stays below the 5 s read timeouts of common HTTP clients, so they hear the 503.
INGEST_DEADLINE_S = env_int("INGEST_DEADLINE_S", 4)
if INGEST_DEADLINE_S < 1:
    raise ImproperlyConfigured("INGEST_DEADLINE_S must be at least 1 second")
# Server processes sharing each API key's rate. While the rate limiter's Redis is away, each
# process admits its share (the key's rate divided by this) on its own, so the deployment as a
# whole stays near the key's rate. RATELIMIT_FAIL_OPEN=true admits everything instead.
# `manage.py serve --workers N` sets it to N when unset; with several hosts, set it to the total.
INGEST_SERVER_PROCESSES = env_int("INGEST_SERVER_PROCESSES", 1)
if INGEST_SERVER_PROCESSES < 1:
    raise ImproperlyConfigured("INGEST_SERVER_PROCESSES must be at least 1")
TOKEN_TTL_S = env_int("TOKEN_TTL_S", 3600)  # client tokens for sockets and SSE
TOKEN_MAX_TTL_S = 24 * 3600
# Tokens minted per API key or session user (django-ratelimit syntax): a page reconnecting in a
# loop must not turn into a flood of signatures.
TOKEN_RATE = env_str("TOKEN_RATE", "120/m")
# The client token `manage.py notify watch` sends when --token is not given: out of shell history.
NOTIFY_TOKEN = env_str("NOTIFY_TOKEN", "")
HEARTBEAT_INTERVAL_S = env_int("HEARTBEAT_INTERVAL_S", 30)  # idle proxies cut at ~60 s
# A socket that has not sent anything for two heartbeat intervals is dead.
HEARTBEAT_TIMEOUT_S = env_int("HEARTBEAT_TIMEOUT_S", 2 * HEARTBEAT_INTERVAL_S)
if HEARTBEAT_TIMEOUT_S <= HEARTBEAT_INTERVAL_S:
    raise ImproperlyConfigured("HEARTBEAT_TIMEOUT_S must be longer than HEARTBEAT_INTERVAL_S")
SOCKET_SEND_QUEUE = env_int("SOCKET_SEND_QUEUE", 256)  # frames buffered per slow socket
# The hub's Redis pub/sub connection: pinged after this many seconds without a message, and
# replaced when the ping has no answer within REALTIME_BUS_SILENT_MAX_S (a partition or a frozen
# host sends no reset, so a silent connection is the only sign). A process that cannot reach Redis
# for REALTIME_BUS_OUTAGE_S closes its realtime clients with 1013: they resume on another process.
REALTIME_BUS_PING_AFTER_S = env_int("REALTIME_BUS_PING_AFTER_S", 5)
REALTIME_BUS_SILENT_MAX_S = env_int("REALTIME_BUS_SILENT_MAX_S", 5)
REALTIME_BUS_OUTAGE_S = env_int("REALTIME_BUS_OUTAGE_S", 3)
if min(REALTIME_BUS_PING_AFTER_S, REALTIME_BUS_SILENT_MAX_S, REALTIME_BUS_OUTAGE_S) < 1:
    raise ImproperlyConfigured(
        "REALTIME_BUS_PING_AFTER_S, REALTIME_BUS_SILENT_MAX_S and REALTIME_BUS_OUTAGE_S must each "
        "be at least 1 second"
    )
# SSE comment every this many seconds: proxies and load balancers cut idle streams at ~30-60 s.
SSE_KEEPALIVE_S = env_int("SSE_KEEPALIVE_S", 15)
if SSE_KEEPALIVE_S < 1:
    raise ImproperlyConfigured("SSE_KEEPALIVE_S must be at least 1 second")
# django-eventstream: send_event() stores through ingest into our durable stream, and our topic
# rules answer its permission checks (docs/sse.md says why its own storage is not used).
# EVENTSTREAM_REDIS stays unset on purpose: its Redis listener never restarts after an outage;
# the hub (channels_app/hub/) is the one bridge from Redis to streams.
EVENTSTREAM_STORAGE_CLASS = "channels_app.sse.NotificationStorage"
EVENTSTREAM_CHANNELMANAGER_CLASS = "channels_app.sse.TopicChannelManager"
# A server process that has not renewed its presence heartbeat for this long is dead: its
# presence entries stop being listed and a live process removes them (channels_app/presence.py).
PRESENCE_TTL_S = env_int("PRESENCE_TTL_S", 30)
DEFAULT_RETENTION_COUNT = env_int("DEFAULT_RETENTION_COUNT", 10_000)
DEFAULT_RETENTION_DAYS = env_int("DEFAULT_RETENTION_DAYS", 7)
# An SMS longer than this many segments is cut (each segment is billed as one message); a
# channel's option max_segments overrides it.
SMS_MAX_SEGMENTS = env_int("SMS_MAX_SEGMENTS", 3)
if SMS_MAX_SEGMENTS < 1:
    raise ImproperlyConfigured("SMS_MAX_SEGMENTS must be at least 1")

DEMO_ADMIN_PASSWORD = env_str("DEMO_ADMIN_PASSWORD", "admin")

# Web Push (routing_app/push/): the VAPID key pair, base64url as `manage.py push keys` prints
# it (the private key's raw 32 bytes, the public key's 65-byte uncompressed point: the browser's
# applicationServerKey), and the contact push services may use (mailto: or https:). Unset: push
# channels' providers are unhealthy and GET /api/v1/push/key answers 503.
WEBPUSH_VAPID_PRIVATE_KEY = env_str("WEBPUSH_VAPID_PRIVATE_KEY")
WEBPUSH_VAPID_PUBLIC_KEY = env_str("WEBPUSH_VAPID_PUBLIC_KEY")
WEBPUSH_VAPID_SUBJECT = env_str("WEBPUSH_VAPID_SUBJECT", "mailto:notify@localhost")
if bool(WEBPUSH_VAPID_PRIVATE_KEY) != bool(WEBPUSH_VAPID_PUBLIC_KEY):
    raise ImproperlyConfigured(
        "set both WEBPUSH_VAPID_PRIVATE_KEY and WEBPUSH_VAPID_PUBLIC_KEY (python manage.py push "
        "keys prints a pair), or neither"
    )
if not WEBPUSH_VAPID_SUBJECT.startswith(("mailto:", "https:")):
    raise ImproperlyConfigured(
        f"WEBPUSH_VAPID_SUBJECT={WEBPUSH_VAPID_SUBJECT!r} must be a mailto: or https: URL "
        "(RFC 8292 section 2.1), e.g. mailto:ops@example.com"
    )
# How long a push service keeps a message for an offline browser, seconds (a push channel's
# option ttl overrides it). pywebpush's default, 0, lets the service drop it at once.
WEBPUSH_TTL_S = env_int("WEBPUSH_TTL_S", 24 * 3600)
if not 0 <= WEBPUSH_TTL_S <= 28 * 24 * 3600:
    raise ImproperlyConfigured("WEBPUSH_TTL_S must be between 0 and 2419200 (28 days)")
# Subscriptions whose endpoint is plain http:// on a loopback address (a local push-service
# stand-in in development and tests); every other endpoint must be https://.
WEBPUSH_LOOPBACK_HTTP = env_bool("WEBPUSH_LOOPBACK_HTTP", DEBUG)

# --- metrics (routing_app/metrics/) ---------------------------------------------------------


def _process_role(argv: list[str]) -> str:
    """What this process is, for its metrics directory and the ``role`` label: ``web`` (an ASGI
    server), ``worker`` (Celery worker), ``beat``, ``test`` or ``cli`` (a manage.py command)."""
    words = " ".join(argv).lower()
    if "pytest" in sys.modules:
        return "test"
    if "celery" in words:
        return "beat" if " beat" in words and " worker" not in words else "worker"
    if any(server in words for server in ("uvicorn", "daphne", "runserver", "gunicorn")):
        return "web"
    return "cli"


# Off: every recording site is a no-op (instruments.py's stand-ins); /metrics still answers with
# the gauges read at collection (state.py). For measuring what recording costs (bench/).
METRICS_ENABLED = env_bool("METRICS_ENABLED", True)
# Bearer token that /metrics accepts (a staff session works too); unset = staff only.
METRICS_TOKEN = env_str("METRICS_TOKEN")
METRICS_ROLE = env_str("NOTIFY_ROLE") or _process_role(sys.argv)
# The host's name in merged snapshots (several hosts publish to one Redis).
METRICS_HOST = env_str("NOTIFY_HOST") or os.uname().nodename
# One directory per host and role of prometheus-client's multiprocess files; /metrics sums every
# role's directory. Set before prometheus_client is imported anywhere (it reads it at import).
# In the project by default (like the SQLite file), private to its owner, one per REDIS_PREFIX.
METRICS_DIR = env_str("METRICS_DIR") or str(BASE_DIR / ".metrics" / REDIS_PREFIX)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(METRICS_DIR, METRICS_ROLE)
METRICS_SNAPSHOT_S = env_int("METRICS_SNAPSHOT_S", 5)  # each host publishes its sums this often
METRICS_HISTORY_S = 15 * 60  # the dashboard's charts show this much of the past
if METRICS_SNAPSHOT_S < 1:
    raise ImproperlyConfigured("METRICS_SNAPSHOT_S must be at least 1 second")
# The alert rules (routing_app/alerts/) are evaluated this often; more often than snapshots are
# taken would only compare the same two snapshots again.
ALERT_EVALUATE_S = env_int("ALERT_EVALUATE_S", METRICS_SNAPSHOT_S)
if ALERT_EVALUATE_S < METRICS_SNAPSHOT_S:
    raise ImproperlyConfigured("ALERT_EVALUATE_S must be at least METRICS_SNAPSHOT_S")
CELERY_BEAT_SCHEDULE["evaluate-alerts"] = {
    "task": "routing_app.alerts.evaluate",
    "schedule": ALERT_EVALUATE_S,
    # Runs queued while no worker took them are stale: the next one compares newer figures.
    "options": {"expires": ALERT_EVALUATE_S},
}

# --- i18n, static -----------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [
    BASE_DIR / "static",
    # The dashboard's charts: only uPlot's dist/ from the npm install (`npm ci --prefix vendor`,
    # which `make run` and `make test` do), never copied into the repo.
    ("vendor/uplot", BASE_DIR / "vendor" / "node_modules" / "uplot" / "dist"),
]
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGIN_URL = "/admin/login/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
