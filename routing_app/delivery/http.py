"""The one HTTP client of the delivery transports (SMS gateways, webhooks, health URLs), and the
one reading of an HTTP answer as a delivery outcome.

- ``client()``: one pooled ``httpx.Client`` per process, so calls to one provider reuse their
  connections (a TLS handshake costs more than most webhook calls). A forked child (a Celery
  prefork worker) starts with a fresh one: sockets shared with the parent would interleave.
- ``timeouts(timeout_s)``: explicit per-call timeouts; each phase (connect, write, read, pool
  wait) is bounded by ``timeout_s``, so one call can take up to about twice ``timeout_s`` when a
  slow connect is followed by a slow answer. The breaker measures the real duration anyway.
- ``call_errors(what)``: httpx's exceptions as ``DeliveryError``.
- ``raise_for_answer(response, what)``: an answer as sent or as ``DeliveryError``.

HTTP semantics: https://www.rfc-editor.org/rfc/rfc9110 (Retry-After: section 10.2.3).
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx

from .transports import DeliveryError

USER_AGENT = "notify/0.1"  # receivers log it; the version of pyproject.toml
# Enough connections for a worker's threads to several providers at once; idle ones are closed
# before typical server keep-alive limits (uvicorn 5 s, nginx 75 s) would cut them mid-request.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0)
BODY_EXCERPT_CHARS = 200  # of a refusing answer's body, in the error message

_client: httpx.Client | None = None
_client_lock = threading.Lock()


def client() -> httpx.Client:
    """This process's pooled client (created on first use). Redirects are not followed: a
    provider URL that redirects is a configuration to fix, not something to chase per call."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = httpx.Client(
                    limits=LIMITS,
                    follow_redirects=False,
                    headers={"user-agent": USER_AGENT},
                )
    return _client


def _forget_client_after_fork() -> None:
    # Dropped, not closed: closing would act on connections the parent still uses.
    global _client, _client_lock
    _client = None
    _client_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_client_after_fork)


def timeouts(timeout_s: float) -> httpx.Timeout:
    """Per-call timeouts: every phase bounded by ``timeout_s`` (see the module docstring)."""
    return httpx.Timeout(connect=timeout_s, read=timeout_s, write=timeout_s, pool=timeout_s)


@contextlib.contextmanager
def call_errors(what: str) -> Iterator[None]:
    """Turn httpx's exceptions raised inside into ``DeliveryError``: a timeout is transient with
    ``timeout=True``; a connection or protocol failure is transient; a URL httpx cannot call
    (bad scheme, malformed) is permanent. ``what`` names the call in the message."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise DeliveryError(f"{what}: timed out ({type(exc).__name__})", timeout=True) from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise DeliveryError(f"{what}: the URL cannot be called: {exc}", permanent=True) from exc
    except httpx.TransportError as exc:
        raise DeliveryError(f"{what}: {type(exc).__name__}: {exc}") from exc


def retry_after_s(response: httpx.Response, now: datetime | None = None) -> float | None:
    """Seconds to wait that the answer's ``Retry-After`` asks for (delay-seconds or an
    HTTP-date), never negative; ``None`` when absent or unreadable."""
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return None
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; obsolete forms may parse as naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _excerpt(response: httpx.Response) -> str:
    text = " ".join(response.text[: BODY_EXCERPT_CHARS * 2].split())
    return text[:BODY_EXCERPT_CHARS]


def raise_for_answer(response: httpx.Response, what: str) -> None:
    """Return when ``response`` is a 2xx; otherwise raise ``DeliveryError`` (with
    ``http_status``):

    - 410 Gone: permanent, ``disable_provider=True`` (the receiver says the endpoint is gone);
    - 408, 429: transient, ``retry_after_s`` from ``Retry-After`` when given;
    - other 4xx, and 3xx (redirects are not followed): permanent; the message carries the start
      of the body, which is where receivers explain a refusal;
    - 5xx and anything else: transient (``retry_after_s`` as for 429, e.g. a 503).
    """
    status = response.status_code
    if 200 <= status < 300:
        return
    excerpt = _excerpt(response)
    detail = f"{what}: answered {status}" + (f": {excerpt}" if excerpt else "")
    if status == 410:
        raise DeliveryError(
            f"{what}: the receiver answered 410 Gone: it no longer takes deliveries",
            permanent=True,
            disable_provider=True,
            http_status=status,
        )
    if status in (408, 429) or status >= 500:
        raise DeliveryError(detail, retry_after_s=retry_after_s(response), http_status=status)
    if 300 <= status < 400:
        location = response.headers.get("location", "")
        raise DeliveryError(
            f"{what}: answered {status} (redirect to {location or 'nowhere'}); redirects are "
            "not followed: put the final URL in the provider",
            permanent=True,
            http_status=status,
        )
    if 400 <= status < 500:
        raise DeliveryError(detail, permanent=True, http_status=status)
    raise DeliveryError(detail, http_status=status)  # 1xx as a final answer: a broken peer


def check_health_url(provider, *, timeout_s: float) -> None:
    """GET the provider option ``health_url`` when set: healthy on a 2xx, ``DeliveryError``
    otherwise (the status, the timeout or the connection failure); healthy when unset."""
    url = (provider.options or {}).get("health_url")
    if not url:
        return
    what = f"health check of provider {provider.name!r} ({url})"
    with call_errors(what):
        response = client().get(url, timeout=timeouts(timeout_s))
    if not 200 <= response.status_code < 300:
        raise DeliveryError(
            f"{what}: answered {response.status_code}", http_status=response.status_code
        )
