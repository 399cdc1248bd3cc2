"""Health checks of outbound providers (every ``HEALTH_CHECK_INTERVAL_S``, from beat or the
embedded loop): the transport's ``check_health`` (SMTP connect + EHLO + NOOP, HTTP GET of the
``health_url`` option). The balancer skips an unhealthy provider; admin shows why, and when it
was last checked. Each check also refreshes the provider's ``BreakerState`` mirror."""

from __future__ import annotations

import logging

from django.conf import settings
from django.utils import timezone

from ..models import Channel, Provider
from .breaker import BreakerConfig, BreakerUnavailable, breakers_from_settings
from .transitions import mirror
from .transports import DeliveryError, transport_for

log = logging.getLogger(__name__)


def check_provider(provider: Provider) -> bool:
    """Check one provider, store the result, return whether it is healthy."""
    error = ""
    try:
        transport_for(provider.channel.kind).check_health(
            provider, timeout_s=settings.HEALTH_CHECK_TIMEOUT_S
        )
    except DeliveryError as exc:
        error = str(exc)[:300] or type(exc).__name__
    healthy = not error
    if healthy != provider.healthy:
        log.warning(
            "provider %s is now %s%s",
            provider,
            "healthy" if healthy else "unhealthy",
            f": {error}" if error else "",
        )
    Provider.objects.filter(pk=provider.pk).update(
        healthy=healthy, health_checked_at=timezone.now(), health_error=error
    )
    provider.healthy, provider.health_error = healthy, error
    return healthy


def check_all() -> dict[str, bool]:
    """Check every enabled provider of an outbound channel; return name -> healthy."""
    results = {}
    breakers = breakers_from_settings()
    providers = Provider.objects.filter(
        enabled=True, channel__kind__in=Channel.OUTBOUND_KINDS
    ).select_related("channel")
    for provider in providers:
        results[str(provider)] = check_provider(provider)
        try:
            mirror(
                provider,
                breakers.snapshot(provider.pk, BreakerConfig.for_channel(provider.channel)),
            )
        except BreakerUnavailable as exc:
            log.warning("breaker state unavailable for %s: %s", provider, exc)
    return results
