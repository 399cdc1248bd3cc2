"""Keep client tokens out of server logs.

Sockets and SSE streams carry their token in the query string (``?token=``), and uvicorn logs
each WebSocket's path with its query string at INFO (``"WebSocket /ws/t/?token=..." [accepted]``,
logger ``uvicorn.error``) and each HTTP request's in its access log (``uvicorn.access``): a log
reader could replay a token until it expires. ``install()`` adds a filter to those loggers that
replaces token values with ``[redacted]``; records stay otherwise intact.
"""

from __future__ import annotations

import logging
import re

TOKEN_RE = re.compile(r"([?&](?:token|authToken)=)[^&\s\"']*")
LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    """``text`` with the value of every ``token=`` query parameter replaced."""
    return TOKEN_RE.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "token=" in a for a in args):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        return True


_filter = RedactTokens()


def install() -> None:
    """Add the filter to uvicorn's loggers (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)
