"""Topic names and topic patterns.

A topic name is lowercase segments of ``[a-z0-9_-]`` separated by ``.`` or ``:``, at most 200
characters: ``alerts.k8s``, ``reverse_flow:cluster-a``, ``user:42``.

A topic pattern is a topic name whose segments may also be wildcards (AMQP-style):

- ``*`` matches exactly one segment: ``alerts.*`` matches ``alerts.disk``, not ``alerts.disk.sda``
  and not ``alerts``;
- ``#`` matches zero or more segments: ``k8s.prod.#`` matches ``k8s.prod``, ``k8s.prod.pod``
  and ``k8s.prod.pod.crash``; ``#`` alone matches every topic;
- ``{name}`` (permission rules only) matches one segment and captures it: ``user:{user_id}``.

The separators ``.`` and ``:`` are interchangeable for matching: a pattern ``reverse_flow:*``
matches ``reverse_flow:cluster-a``.
"""

from __future__ import annotations

import functools
import re

from django.core.exceptions import ValidationError

TOPIC_MAX_LENGTH = 200
_SEGMENT = r"[a-z0-9_-]+"
# Anchored with \Z, not $: "$" also matches before a final newline ("alerts.k8s\n").
TOPIC_RE = re.compile(rf"^{_SEGMENT}(?:[.:]{_SEGMENT})*\Z")
# The same rule for the API schema, in ECMA-262 syntax (pydantic and OpenAPI), where "$" is only
# the end of the text and "\Z" does not exist.
TOPIC_SCHEMA_PATTERN = rf"^{_SEGMENT}(?:[.:]{_SEGMENT})*$"
_PATTERN_SEGMENT = re.compile(r"^(?:[a-z0-9_-]+|\*|#|\{[a-z_][a-z0-9_]*\})\Z")
_SPLIT = re.compile(r"[.:]")


def is_valid_topic(name: str) -> bool:
    return isinstance(name, str) and len(name) <= TOPIC_MAX_LENGTH and bool(TOPIC_RE.match(name))


def validate_topic_name(name: str) -> None:
    """Raise ValidationError with a message saying how to fix a bad topic name."""
    if not isinstance(name, str) or not name:
        raise ValidationError("topic is required")
    if len(name) > TOPIC_MAX_LENGTH:
        raise ValidationError(f"topic is longer than {TOPIC_MAX_LENGTH} characters")
    if not TOPIC_RE.match(name):
        raise ValidationError(
            f"topic {name!r} is not valid: use lowercase segments of a-z, 0-9, _ or - "
            "separated by '.' or ':' (e.g. 'alerts.k8s', 'user:42')"
        )


def validate_topic_pattern(pattern: str) -> None:
    if not pattern or len(pattern) > TOPIC_MAX_LENGTH:
        raise ValidationError(f"pattern must be 1 to {TOPIC_MAX_LENGTH} characters")
    for segment in _SPLIT.split(pattern):
        if not _PATTERN_SEGMENT.match(segment):
            raise ValidationError(
                f"pattern {pattern!r} has a bad segment {segment!r}: segments are lowercase "
                "[a-z0-9_-], '*' (one segment), '#' (any number of segments) or '{name}'"
            )


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    segments = _SPLIT.split(pattern)
    for index, segment in enumerate(segments):
        first = index == 0
        sep = "" if first else "[.:]"
        if segment == "#":
            # zero or more segments; absorbs its own separator so 'a.#' matches 'a'
            parts.append(f"(?:{_SEGMENT}(?:[.:]{_SEGMENT})*)?" if first else f"(?:[.:]{_SEGMENT})*")
            continue
        if segment == "*":
            parts.append(f"{sep}{_SEGMENT}")
        elif segment.startswith("{"):
            parts.append(f"{sep}(?P<{segment[1:-1]}>{_SEGMENT})")
        else:
            parts.append(f"{sep}{re.escape(segment)}")
    regex = "".join(parts)
    # '#' first followed by more segments: the next segment's separator is optional
    regex = regex.replace(")?[.:]", ")?(?:^|[.:])", 1) if segments[0] == "#" else regex
    return re.compile(f"^{regex}\\Z")


def match_topic(pattern: str, topic: str) -> dict[str, str] | None:
    """Return the captured parameters if ``topic`` matches ``pattern``, else None."""
    found = _compile(pattern).match(topic)
    return None if found is None else found.groupdict()


def topic_matches(pattern: str, topic: str) -> bool:
    return _compile(pattern).match(topic) is not None


def matches_any(patterns: list[str], topic: str) -> bool:
    return any(topic_matches(p, topic) for p in patterns)
