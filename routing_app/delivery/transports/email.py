"""Email through Django's email machinery: SMTP, any django-anymail ESP, or the log.

Provider URLs:

- ``smtp://[user@]host[:port][?starttls=true]``: SMTP (port 25 by default); with a user, SMTP
  AUTH with the provider's secret as the password, after STARTTLS when ``starttls=true``.
  https://www.rfc-editor.org/rfc/rfc5321 (SMTP), rfc4954 (AUTH), rfc3207 (STARTTLS)
- ``smtps://[user@]host[:port]``: SMTP over implicit TLS (port 465 by default), rfc8314.
- ``anymail://<esp>``: ``anymail.backends.<esp>.EmailBackend`` (postmark, mailgun, amazon_ses,
  ...), with the provider's secret as the ESP's key (``ESP_SECRET_KWARG``; without a secret the
  key comes from settings.ANYMAIL) and the provider option ``anymail`` (a dict) as further backend
  arguments, e.g. ``{"sender_domain": "mg.example.com"}``. https://anymail.dev/en/stable/esps/
- ``console://``: the rendered email goes to the log (INFO, logger ``routing_app.delivery.email``).

Backends are kept between sends, per provider and process (an SMTP connection is reused while it
was used within ``SMTP_IDLE_S``; an ESP's HTTP session always). A backend is used by one send at
a time, since an SMTP connection is one conversation: concurrent sends to one provider each take
an idle backend or open another (one connection per provider and process serialized a worker's
email threads: bench/delivery.py).

Subject, text and HTML come from ``templates/notify/email/<event>.subject.txt``, ``.txt`` and
``.html`` (else ``default.*``); see ``rendering``.
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib
import logging
import os
import random
import re
import smtplib
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.policy import Compat32
from urllib.parse import parse_qs, unquote, urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMultiAlternatives, make_msgid
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.mail.utils import DNS_NAME

from .. import http, rendering
from . import DeliveryError, Receipt, provider_secret

logger = logging.getLogger("routing_app.delivery.email")

SMTP_PORT, SMTPS_PORT = 25, 465
# A kept SMTP connection idle longer than this is closed and opened anew rather than reused:
# servers drop idle clients (RFC 5321 suggests 5 minutes, busy relays cut far sooner), and a
# send on a dropped connection costs a failed round trip before the retry.
SMTP_IDLE_S = 30.0
SUBJECT_MAX_CHARS = 200  # a longer rendered subject is cut (mail clients show ~80)
# The backend argument that carries each ESP's secret; "api_key" for the others.
ESP_SECRET_KWARG = {
    "postmark": "server_token",
    "mailersend": "api_token",
    "mailtrap": "api_token",
    "scaleway": "secret_key",
    "amazon_ses": None,  # boto3's own credentials (AWS_* environment, instance role)
    "test": None,
}
ESP_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*\Z")


# --- the message ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= SUBJECT_MAX_CHARS else line[: SUBJECT_MAX_CHARS - 1] + "…"


class HeaderFolding(Compat32):
    """The stdlib's ``compat32`` policy (Django's), with a short cut for what most headers are:
    printable ASCII that fits on one line is written as it is, which is what ``compat32``'s own
    folding (an ``email.header.Header`` per header) returns for it. Measured on this machine:
    flattening a notification email took 325 us of CPU with ``compat32``'s folding, 83 us with
    this (the same bytes). Anything else (long, non-ASCII, control characters, tabs) goes to
    ``compat32``."""

    def _one_line(self, name: str, value) -> bool:
        limit = self.max_line_length
        return (
            isinstance(value, str)
            and value.isascii()
            and value.isprintable()
            and (not limit or len(name) + 2 + len(value) <= limit)
        )

    def fold(self, name, value):
        if self._one_line(name, value):
            return f"{name}: {value}{self.linesep}"
        return super().fold(name, value)

    def fold_binary(self, name, value):
        if self._one_line(name, value):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


HEADER_FOLDING = HeaderFolding()


class _Email(EmailMultiAlternatives):
    """An ``EmailMultiAlternatives`` whose MIME boundary is chosen when the message is built,
    flattened with ``HeaderFolding``.

    Left unset, the stdlib's generator picks one while flattening and compiles a regular
    expression of it to search the parts for it: a new pattern per message, never cached, a
    fifth of the flattening in the worker's profile (bench/delivery_cpu.py --py-spy).
    Here the same kind of random boundary is checked against the parts' payloads with a
    substring search, which finds every place the stdlib's line-anchored pattern could."""

    def message(self, **kwargs):
        msg = super().message(**kwargs)
        if msg.is_multipart():
            payloads = [part.get_payload() for part in msg.walk() if not part.is_multipart()]
            texts = [p for p in payloads if isinstance(p, str)]
            while True:
                boundary = BOUNDARY_FORMAT % random.randrange(sys.maxsize)  # noqa: S311
                if not any(boundary in text for text in texts):
                    break
            msg.set_boundary(boundary)
        # The generator flattens every part with the outer message's policy.
        msg.policy = HEADER_FOLDING
        return msg


# The stdlib generator's own form (email.generator.Generator._make_boundary).
BOUNDARY_FORMAT = "=" * 15 + "%0" + str(len(repr(sys.maxsize - 1))) + "d=="


def build_message(delivery) -> EmailMultiAlternatives:
    """The rendered email of ``delivery``: subject on one line, the text body, the HTML one as
    an alternative; From the channel option ``from_email`` (else ``DEFAULT_FROM_EMAIL``),
    Reply-To the option ``reply_to``. Raises a permanent ``DeliveryError`` for a broken
    template."""
    options = delivery.channel.options or {}
    event = delivery.notification.event
    context = rendering.template_context(delivery)
    subject = rendering.render("email", event, ".subject.txt", context, autoescape=False)
    text = rendering.render("email", event, ".txt", context, autoescape=False)
    html = rendering.render("email", event, ".html", context, autoescape=True)
    from_email = options.get("from_email") or settings.DEFAULT_FROM_EMAIL
    domain = email.utils.parseaddr(from_email)[1].rpartition("@")[2] or "notify.invalid"
    message = _Email(
        subject=_one_line(subject),
        body=text,
        from_email=from_email,
        to=[delivery.recipient],
        reply_to=[options["reply_to"]] if options.get("reply_to") else None,
        headers={
            # Given here so that Django does not look up this host's FQDN for it.
            "Message-ID": make_msgid(domain=domain),
            # RFC 3834: no vacation auto-replies to machine-sent notifications.
            "Auto-Submitted": "auto-generated",
            "X-Notify-Delivery": str(delivery.pk),
        },
    )
    message.attach_alternative(html, "text/html")
    return message


# --- errors --------------------------------------------------------------------------------


def _smtp_error(exc: Exception, what: str, provider) -> DeliveryError:
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return DeliveryError(
            f"{what}: the server refused the login ({exc.smtp_code} {_reply(exc.smtp_error)}): "
            f"check the user in the URL and the password in {provider.credentials_env or '(none)'}",
            permanent=True,
        )
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        replies = "; ".join(
            f"{rcpt}: {code} {_reply(msg)}" for rcpt, (code, msg) in exc.recipients.items()
        )
        # 4xx on RCPT is "not now" (greylisting, a full mailbox): worth another try.
        permanent = all(code >= 500 for code in codes)
        return DeliveryError(f"{what}: recipient refused: {replies}", permanent=permanent)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return DeliveryError(f"{what}: {exc} (fix the provider URL)", permanent=True)
    if isinstance(exc, smtplib.SMTPResponseException):
        return DeliveryError(
            f"{what}: {type(exc).__name__} {exc.smtp_code} {_reply(exc.smtp_error)}",
            permanent=exc.smtp_code >= 500,
        )
    if isinstance(exc, TimeoutError):
        return DeliveryError(f"{what}: timed out", timeout=True)
    # SMTPServerDisconnected, refused connections, TLS failures, resets: another try may work.
    return DeliveryError(f"{what}: {type(exc).__name__}: {exc}")


def _reply(raw) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _anymail_error(exc: Exception, what: str) -> DeliveryError:
    from anymail.exceptions import (
        AnymailAPIError,
        AnymailInvalidAddress,
        AnymailRecipientsRefused,
        AnymailSerializationError,
        AnymailUnsupportedFeature,
    )

    message = f"{what}: {' '.join(str(exc).split())[:300]}"
    if isinstance(exc, AnymailRecipientsRefused | AnymailInvalidAddress):
        return DeliveryError(message, permanent=True)
    if isinstance(exc, AnymailUnsupportedFeature | AnymailSerializationError):
        return DeliveryError(message, permanent=True)
    if isinstance(exc, ImproperlyConfigured):  # AnymailConfigurationError: a missing setting
        return DeliveryError(message, permanent=True)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, AnymailAPIError) and status is not None:
        response = getattr(exc, "response", None)
        retry_after = None
        if response is not None and status in (429, 503):
            retry_after = http.retry_after_s(response)
        permanent = 400 <= status < 500 and status not in (408, 429)
        return DeliveryError(
            message, permanent=permanent, http_status=status, retry_after_s=retry_after
        )
    # No answer at all: requests' timeout or connection error is the cause.
    cause = exc.__cause__
    timed_out = cause is not None and "Timeout" in type(cause).__name__
    return DeliveryError(message, timeout=timed_out)


# --- backends, one per provider and process -----------------------------------------------


@dataclass(frozen=True)
class SMTPTarget:
    """An ``smtp://`` or ``smtps://`` provider URL, read."""

    host: str
    port: int
    username: str
    use_ssl: bool
    use_tls: bool


def parse_smtp_url(url: str) -> SMTPTarget:
    """Read an SMTP provider URL (see the module docstring); ``DeliveryError`` (permanent)
    when it is malformed or carries a password, which belongs in the environment."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
        host = None
    else:
        host = parts.hostname
    if parts.scheme not in ("smtp", "smtps") or not host:
        raise DeliveryError(f"{url!r} is not smtp://[user@]host[:port]", permanent=True)
    if parts.password is not None:
        raise DeliveryError(
            "the SMTP URL holds a password: remove it and name an environment variable in "
            "the provider's credentials instead",
            permanent=True,
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"starttls"}
    starttls = query.get("starttls", ["false"])[-1].lower()
    if unknown or starttls not in ("true", "false"):
        raise DeliveryError(
            f"the SMTP URL's query may only be ?starttls=true or ?starttls=false, not "
            f"{parts.query!r}",
            permanent=True,
        )
    if parts.scheme == "smtps" and starttls == "true":
        raise DeliveryError("smtps:// is TLS already: drop ?starttls=true", permanent=True)
    return SMTPTarget(
        host=host,
        port=port or (SMTPS_PORT if parts.scheme == "smtps" else SMTP_PORT),
        username=unquote(parts.username or ""),
        use_ssl=parts.scheme == "smtps",
        use_tls=starttls == "true",
    )


@dataclass
class _Kept:
    backend: object
    last_used: float = 0.0  # time.monotonic() of the last successful send
    dropped: bool = False  # closed after a failure: not put back


# Idle backends per provider key (see ``_borrowed``). A busy backend is in no list: each send has
# one to itself (an SMTP connection is one conversation), so a provider has at most as many as
# sends run at once in this process (DELIVERY_THREADS).
_idle: dict[tuple, list[_Kept]] = {}
_kept_lock = threading.Lock()


def _forget_after_fork() -> None:
    # A child must not talk on the parent's SMTP sockets; the objects are dropped, not closed.
    global _kept_lock
    _idle.clear()
    _kept_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _smtp_backend(provider, timeout_s: float) -> SMTPBackend:
    target = parse_smtp_url(provider.url)
    password = ""
    if target.username:
        password = provider_secret(provider)
        if not password:
            raise DeliveryError(
                f"provider {provider.name!r}: the URL names user {target.username!r} but the "
                "provider names no credentials environment variable for the password",
                permanent=True,
            )
    return SMTPBackend(
        host=target.host,
        port=target.port,
        username=target.username or None,
        password=password or None,
        use_tls=target.use_tls,
        use_ssl=target.use_ssl,
        timeout=timeout_s,
        fail_silently=False,
    )


def _anymail_backend(provider, timeout_s: float):
    esp = provider.url.removeprefix("anymail://").strip("/")
    if not ESP_NAME_RE.match(esp):
        raise DeliveryError(f"{provider.url!r} is not anymail://<esp>", permanent=True)
    extra = (provider.options or {}).get("anymail") or {}
    if not isinstance(extra, dict):
        raise DeliveryError("the provider option anymail must be an object", permanent=True)
    kwargs = dict(extra)
    secret_kwarg = ESP_SECRET_KWARG.get(esp, "api_key")
    secret = provider_secret(provider)
    if secret and secret_kwarg:
        kwargs[secret_kwarg] = secret
    what = f"email provider {provider.name!r} (anymail {esp})"
    try:
        module = importlib.import_module(f"anymail.backends.{esp}")
        backend = module.EmailBackend(fail_silently=False, timeout=timeout_s, **kwargs)
    except ImportError as exc:
        raise DeliveryError(f"{what}: cannot load its backend: {exc}", permanent=True) from exc
    except ImproperlyConfigured as exc:
        raise DeliveryError(f"{what}: {' '.join(str(exc).split())}", permanent=True) from exc
    return backend


@contextlib.contextmanager
def _borrowed(provider, timeout_s: float, *, fresh: bool = False) -> Iterator[_Kept]:
    """A backend of ``provider`` for one send: an idle kept one (unless ``fresh``), else a new
    one; put back afterwards unless it was dropped. A changed URL, options or secret retires
    the provider's older backends (idle ones at once, busy ones when they come back)."""
    secret_marker = provider_secret(provider)  # a changed secret builds a new backend
    key = (provider.pk, provider.url, repr(provider.options), hash(secret_marker))
    with _kept_lock:
        for old in [k for k in _idle if k[0] == provider.pk and k != key]:
            for retired in _idle.pop(old):
                _close_quietly(retired.backend)
        shelf = _idle.setdefault(key, [])
        kept = shelf.pop() if shelf and not fresh else None
    if kept is None:
        build = _smtp_backend if provider.url.startswith(("smtp://", "smtps://")) else None
        kept = _Kept((build or _anymail_backend)(provider, timeout_s))
    try:
        yield kept
    finally:
        with _kept_lock:
            shelf = _idle.get(key)
            if kept.dropped:
                pass
            elif shelf is None:  # retired while it was busy
                _close_quietly(kept.backend)
            else:
                shelf.append(kept)


def _close_quietly(backend) -> None:
    # Without a QUIT round trip: the peer may be the reason we are closing.
    connection = getattr(backend, "connection", None)
    if isinstance(connection, smtplib.SMTP):
        connection.close()
        backend.connection = None


def _drop(kept: _Kept) -> None:
    kept.dropped = True
    _close_quietly(kept.backend)


# --- sending --------------------------------------------------------------------------------


def _send_smtp(provider, message, timeout_s: float) -> Receipt:
    what = f"SMTP provider {provider.name!r}"
    for again in (False, True):  # again only when a kept connection turned out to be dropped
        # Again on a new connection: the other idle ones may have been dropped too.
        with _borrowed(provider, timeout_s, fresh=again) as kept:
            backend = kept.backend
            backend.timeout = timeout_s
            reused = backend.connection is not None
            if reused and time.monotonic() - kept.last_used > SMTP_IDLE_S:
                _close_quietly(backend)
                reused = False
            if reused:
                backend.connection.sock.settimeout(timeout_s)
            try:
                backend.open()
                backend.send_messages([message])
            except smtplib.SMTPServerDisconnected as exc:
                _drop(kept)
                if reused:
                    logger.info("%s: the kept connection was closed by the server, reopening", what)
                    continue
                raise _smtp_error(exc, what, provider) from exc
            except OSError as exc:  # smtplib's errors are OSErrors too
                _drop(kept)
                raise _smtp_error(exc, what, provider) from exc
            kept.last_used = time.monotonic()
            return Receipt(provider_message_id=message.extra_headers["Message-ID"])
    raise AssertionError("unreachable: the second try returns or raises")


def _send_anymail(provider, message, timeout_s: float) -> Receipt:
    from anymail.exceptions import AnymailError

    what = f"email provider {provider.name!r}"
    with _borrowed(provider, timeout_s) as kept:
        backend = kept.backend
        if hasattr(backend, "timeout"):  # the requests-based ESPs
            backend.timeout = timeout_s
        try:
            backend.open()  # keeps its HTTP session for the next sends
            backend.send_messages([message])
        except (AnymailError, ImproperlyConfigured) as exc:
            raise _anymail_error(exc, what) from exc
        kept.last_used = time.monotonic()
    status = getattr(message, "anymail_status", None)
    message_id = getattr(status, "message_id", None) or message.extra_headers["Message-ID"]
    return Receipt(
        provider_message_id=str(message_id),
        detail=", ".join(sorted(getattr(status, "status", None) or [])),
    )


def _log_message(provider, message) -> Receipt:
    html = next((body for body, mimetype in message.alternatives if mimetype == "text/html"), "")
    logger.info(
        "email to %s from %s (provider %s)\nSubject: %s\n\n%s\n[and an HTML part of %d chars]",
        ", ".join(message.to),
        message.from_email,
        provider.name,
        message.subject,
        message.body.rstrip(),
        len(html),
    )
    return Receipt(provider_message_id=message.extra_headers["Message-ID"], detail="logged")


class EmailTransport:
    def send(self, delivery, provider, *, timeout_s: float) -> Receipt:
        """Send the rendered email of ``delivery`` to ``delivery.recipient`` through
        ``provider``. Returns a ``Receipt`` with the ESP's message id (SMTP and console: the
        Message-ID header). Raises ``DeliveryError``: permanent for refused recipients (5xx),
        refused logins, a broken configuration or template, ESP answers 4xx (not 408/429);
        transient for 4xx SMTP replies, lost or refused connections, timeouts
        (``timeout=True``), ESP answers 5xx/408/429."""
        message = build_message(delivery)
        url = provider.url
        if url.startswith("console://"):
            return _log_message(provider, message)
        if url.startswith(("smtp://", "smtps://")):
            return _send_smtp(provider, message, timeout_s)
        if url.startswith("anymail://"):
            return _send_anymail(provider, message, timeout_s)
        raise DeliveryError(
            f"provider {provider.name!r}: {url!r} is not smtp://, smtps://, anymail:// or "
            "console://",
            permanent=True,
        )

    def check_health(self, provider, *, timeout_s: float) -> None:
        """SMTP: connect, EHLO, NOOP (``DeliveryError`` unless each succeeds in time);
        anymail: GET the ``health_url`` option when set; console: always healthy."""
        url = provider.url
        if url.startswith(("smtp://", "smtps://")):
            _check_smtp(provider, timeout_s)
        elif url.startswith("anymail://"):
            http.check_health_url(provider, timeout_s=timeout_s)


@contextlib.contextmanager
def _smtp_conversation(target: SMTPTarget, timeout_s: float) -> Iterator[smtplib.SMTP]:
    kwargs = {"timeout": timeout_s, "local_hostname": DNS_NAME.get_fqdn()}
    if target.use_ssl:
        connection = smtplib.SMTP_SSL(
            target.host, target.port, context=ssl.create_default_context(), **kwargs
        )
    else:
        connection = smtplib.SMTP(target.host, target.port, **kwargs)
    try:
        yield connection
    finally:
        try:
            connection.quit()
        except OSError:
            connection.close()


def _check_smtp(provider, timeout_s: float) -> None:
    target = parse_smtp_url(provider.url)
    what = f"health check of SMTP provider {provider.name!r}"
    try:
        with _smtp_conversation(target, timeout_s) as connection:
            code, reply = connection.ehlo()
            if code != 250:
                raise smtplib.SMTPHeloError(code, reply)
            code, reply = connection.noop()
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
    except OSError as exc:
        raise _smtp_error(exc, what, provider) from exc


transport = EmailTransport()
