"""Failover to backup channels: a dead delivery, or one whose channel has no provider that may be
called, becomes a delivery of the same notification on the channel's backup channel (following
the chain of backups, never in a cycle), to the same recipient where the backup can reach them."""

from __future__ import annotations

import logging

from ..models import Channel, Delivery
from . import dispatch

log = logging.getLogger(__name__)


def fail_over(row: Delivery, *, reason: str = "") -> Delivery | None:
    """Create the delivery of ``row``'s notification on the first backup channel that can reach
    the recipient, and schedule it after commit. Returns it (or the one that already existed),
    or None when no backup channel can reach the recipient."""
    channel = row.channel
    seen = {channel.pk}
    backup = _backup_of(channel)
    while backup is not None and backup.pk not in seen:
        seen.add(backup.pk)
        recipient = _recipient_on(backup, row, channel)
        if backup.enabled and recipient:
            created, new = Delivery.objects.get_or_create(
                notification_id=row.notification_id,
                channel=backup,
                recipient=recipient,
                defaults={"user_id": row.user_id, "failover_from": row},
            )
            if new:
                log.warning(
                    "delivery %s fails over from %s to %s%s",
                    row.pk,
                    channel.name,
                    backup.name,
                    f" ({reason})" if reason else "",
                )
                dispatch.schedule_on_commit([created.pk])
            return created
        backup = _backup_of(backup)
    return None


def _backup_of(channel: Channel) -> Channel | None:
    if channel.backup_id is None:
        return None
    return Channel.objects.filter(pk=channel.backup_id).first()


def _recipient_on(backup: Channel, row: Delivery, original: Channel) -> str:
    """Where the recipient of ``row`` is reached on ``backup``: the same address on a channel of
    the same kind, the webhook's own URLs (``*``), else the user's address of that kind."""
    if backup.kind == original.kind:
        return row.recipient
    if backup.kind == Channel.Kind.WEBHOOK:
        return "*"
    if row.user_id is None:
        return ""
    from ..router import user_address  # the router owns where users are reached

    return user_address(row.user, backup.kind) or ""
