"""What an email or SMS says: templates per event, chosen and rendered the same way for both.

Templates live in ``templates/notify/<kind>/``: ``<event><suffix>`` when it exists, else
``default<suffix>`` (``pod.crashloop.txt``, ``default.txt``). Their context is the notification's
envelope (``topic, seq, id, event, data, severity, source, ts``) plus ``notification``,
``delivery``, ``channel`` and ``data_items``, the data as (key, text) pairs: use it rather than
``data.items``, which a data key named ``items`` would shadow in Django's template lookup.
"""

from __future__ import annotations

import json
import re

from django.template import Context, TemplateDoesNotExist, TemplateSyntaxError
from django.template.loader import select_template

from .transports import DeliveryError

# An event name used as a file name: dots are fine (``alert.firing``), path separators and a
# leading dot are not. Other events get the default template.
EVENT_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


def template_names(kind: str, event: str, suffix: str) -> list[str]:
    """The templates to try, in order, for ``event`` over channel kind ``kind``."""
    default = f"notify/{kind}/default{suffix}"
    if EVENT_FILE_NAME_RE.match(event):
        return [f"notify/{kind}/{event}{suffix}", default]
    return [default]


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))


def template_context(delivery) -> dict:
    """The context every delivery template gets (see the module docstring)."""
    notification = delivery.notification
    context = notification.envelope()
    data = context["data"] if isinstance(context["data"], dict) else {}
    context.update(
        notification=notification,
        delivery=delivery,
        channel=delivery.channel,
        data_items=[(str(key), _text(value)) for key, value in data.items()],
    )
    return context


def render(kind: str, event: str, suffix: str, context: dict, *, autoescape: bool) -> str:
    """Render the first existing template of ``template_names``. ``autoescape=False`` for plain
    text (an email's text part, an SMS), where HTML escaping would garble ``<`` and ``&``.

    A missing default or a template that does not compile is a configuration error: raised as
    a permanent ``DeliveryError`` naming the template (retrying cannot fix it).
    """
    names = template_names(kind, event, suffix)
    try:
        template = select_template(names)
    except TemplateDoesNotExist as exc:
        raise DeliveryError(
            f"no template for {kind} event {event!r}: add {names[-1]} (templates/)", permanent=True
        ) from exc
    except TemplateSyntaxError as exc:
        raise DeliveryError(
            f"a template of {kind} event {event!r} does not compile: {exc}", permanent=True
        ) from exc
    # The Django backend's template renders with the engine's autoescaping (on); its inner
    # template takes a Context that says otherwise.
    inner = getattr(template, "template", None)
    if inner is not None:
        return inner.render(Context(context, autoescape=autoescape))
    return template.render(context)
