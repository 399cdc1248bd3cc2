"""The WebSocket close codes the realtime edge sends, one enum for the plain and Phoenix sockets.

RFC 6455 section 7.4 (https://www.rfc-editor.org/rfc/rfc6455#section-7.4): 1009 and 1011 are
the standard's own, 1013 is registered with IANA ("Try Again Later"), and 4000-4999 is the range
kept for applications; ours echo the HTTP status of the same refusal (4403 ~ 403) so a client
author can guess them. The JavaScript client's copy is ``static/notify/codes.js``; a client
decides from the code whether to reconnect (1009, 1011, 1013, 4408, 4429), renew its token (4401)
or give up (4400, 4403). SSE has no close codes: it answers with the matching HTTP status before
the stream starts, and after that ends the stream with a ``stream-error`` event
(``frames.error``).
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """The code of a close the server initiates. Members are ints: pass them wherever ASGI takes
    a close code."""

    TOO_BIG = 1009
    """A client frame over ``settings.MAX_MESSAGE_BYTES`` (64 KB)."""

    INTERNAL_ERROR = 1011
    """The server could not send a frame it owed the client (a server bug, logged as a warning):
    reconnect and resume."""

    TRY_LATER = 1013
    """The realtime bus (Redis) or the database is unavailable: reconnect later."""

    BAD_REQUEST = 4400
    """Bad topic name or ``since``; on the Phoenix socket, an unsupported protocol version."""

    UNAUTHENTICATED = 4401
    """Missing, forged or expired token (and no session) where the topic needs a login."""

    FORBIDDEN = 4403
    """The topic is not allowed to this principal, or the page's origin is not allowed."""

    HEARTBEAT_TIMEOUT = 4408
    """Nothing received from the client for ``settings.HEARTBEAT_TIMEOUT_S``."""

    TOO_SLOW = 4429
    """The client read too slowly: its send queue (``settings.SOCKET_SEND_QUEUE``) filled up."""
