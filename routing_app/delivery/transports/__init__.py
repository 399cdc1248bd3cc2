"""One interface for every outbound channel kind, one registry by kind, one error type.

A transport is a module-level object with

- ``send(delivery, provider, *, timeout_s) -> Receipt``: hand one delivery to one provider within
  ``timeout_s`` (the breaker's call timeout); raise ``DeliveryError`` when it was not accepted;
- ``check_health(provider, *, timeout_s) -> None``: raise ``DeliveryError`` when the provider
  cannot take calls now (SMTP connect + EHLO + NOOP, HTTP GET of the ``health_url`` option);

and, where a kind needs them (push does), two hooks that run on the thread that claimed the rows
and may use the database, which ``send`` must not:

- ``prepare(deliveries) -> None``: load what ``send`` will need of the claimed rows (push: each
  recipient's subscription, its keys);
- ``settled(delivery, error) -> None``: after a call, what the kind keeps of its outcome
  (``error`` None: sent; push: the subscription's last success, or its removal when the push
  service says it is gone).

``delivery`` is a ``Delivery`` with its ``notification`` (and that one's ``topic``) and ``channel``
loaded; ``provider`` a ``Provider``. Secrets come from the environment variable the provider's
``credentials_env`` names, read at call time (``provider_secret``), never stored or logged.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Receipt:
    """What a provider answered when it accepted a delivery."""

    provider_message_id: str = ""  # the provider's id (Twilio's sid, the SMTP queue id), if any
    http_status: int | None = None
    detail: str = ""


class DeliveryError(Exception):
    """A provider did not accept a delivery.

    ``permanent``: trying again cannot help (a 400, a refused recipient): the delivery is dead.
    Otherwise transient: the next provider is tried at once and the delivery retried later, not
    before ``retry_after_s`` when the provider said so. ``timeout``: the call ran past its time.
    ``disable_provider``: the provider itself is gone (a webhook's 410): disable it, with this
    error's message as the reason. ``recipient_gone``: the recipient's address no longer exists
    (a push subscription the push service answers 404/410 for): the transport's ``settled``
    forgets it.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        retry_after_s: float | None = None,
        http_status: int | None = None,
        timeout: bool = False,
        disable_provider: bool = False,
        recipient_gone: bool = False,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after_s = retry_after_s
        self.http_status = http_status
        self.timeout = timeout
        self.disable_provider = disable_provider
        self.recipient_gone = recipient_gone


class Transport(Protocol):
    def send(self, delivery, provider, *, timeout_s: float) -> Receipt: ...

    def check_health(self, provider, *, timeout_s: float) -> None: ...


def provider_secret(provider) -> str:
    """The secret of ``provider`` from the environment variable it names ('' when none).

    A named variable that is unset is a configuration error: permanent until an admin fixes it,
    and the message names the variable, never a value.
    """
    if not provider.credentials_env:
        return ""
    value = os.environ.get(provider.credentials_env)
    if value is None:
        raise DeliveryError(
            f"environment variable {provider.credentials_env} (credentials of provider "
            f"{provider.name!r}) is not set: set it in the worker's environment",
            permanent=True,
        )
    return value


@functools.cache
def _registry() -> dict[str, Transport]:
    # Imported on first use: the transports import this module's types.
    from . import email, push, sms, webhook

    return {
        "email": email.transport,
        "sms": sms.transport,
        "webhook": webhook.transport,
        "push": push.transport,
    }


def transport_for(kind: str) -> Transport:
    """The transport of a channel kind: ``email``, ``sms``, ``webhook`` or ``push``."""
    try:
        return _registry()[kind]
    except KeyError:
        raise LookupError(f"no transport for channel kind {kind!r}") from None
