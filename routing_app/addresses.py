"""Literal recipient addresses and the outbound channel kind each belongs to.

A route's literal addresses (``Route.addresses``) and a notification's extra ``recipients`` are
plain strings: an http(s) URL goes to webhook channels, a ``+`` and digits (E.164) to SMS ones,
anything with an ``@`` to email ones.

models.py imports this module (``Route.clean`` refuses an address that fits no kind), so it must
not import models: the kinds are ``Channel.Kind``'s values, which models.py checks at import.
"""

from __future__ import annotations

EMAIL = "email"
SMS = "sms"
WEBHOOK = "webhook"
ADDRESS_KINDS = (EMAIL, SMS, WEBHOOK)


def address_kind(address: str) -> str | None:
    """Which outbound kind a literal address belongs to (None when it fits none)."""
    if address.startswith(("http://", "https://")):
        return WEBHOOK
    if address.startswith("+") and address[1:].isdigit():
        return SMS
    if "@" in address:
        return EMAIL
    return None
