"""Keep client tokens, and tracebacks a client can cause at will, out of server logs.

Sockets and SSE streams carry their token in the query string (``?token=``), and uvicorn logs
each WebSocket's path with its query string at INFO (``"WebSocket /ws/t/?token=..." [accepted]``,
logger ``uvicorn.error``) and each HTTP request's in its access log (``uvicorn.access``): a log
reader could replay a token until it expires. ``install()`` adds a filter to those loggers that
replaces token values with ``[redacted]``; records stay otherwise intact.

uvicorn's WebSocket protocol logs a text frame that is not UTF-8 with ``logger.exception`` (an
ERROR and a traceback) and then closes the socket with 1007, as it should: the fault is the
client's, and any client could fill the log with tracebacks. ``install()`` also turns that record
into one INFO line without the traceback.
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


# What uvicorn logs with a traceback although only the client was wrong.
CLIENT_FAULTS = frozenset({"Invalid UTF-8 sequence received from client."})


class ClientFaultsAtInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in CLIENT_FAULTS and record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


_filters = (RedactTokens(), ClientFaultsAtInfo())


def install() -> None:
    """Add the filters to uvicorn's loggers (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for log_filter in _filters:
            if log_filter not in logger.filters:
                logger.addFilter(log_filter)
