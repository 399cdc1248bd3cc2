"""WebSocket routing: the plain JSON socket and the Phoenix socket, behind the origin check.

No ``AuthMiddlewareStack``: ``socket_auth.principal_for_scope`` reads the token or the session
cookie itself, only when a socket connects, instead of resolving a session user for every
connection in Django's one shared sync thread before the app even runs.
"""

from channels.routing import URLRouter
from django.urls import path

from . import log_redaction
from .close_codes import CloseCode
from .phoenix import phoenix_app
from .socket_auth import origin_allowed
from .ws_plain import plain_socket_app

websocket_urlpatterns: list = [
    path("ws/<str:topic>/", plain_socket_app),
    path("socket/websocket", phoenix_app),  # Phoenix Channels V2 (?vsn=2.0.0)
]


class OriginCheck:
    """Refuse (HTTP 403 at the handshake) sockets opened by pages of other origins."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            event = await receive()
            if event["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": CloseCode.FORBIDDEN})
            return
        return await self.app(scope, receive, send)


websocket_application = OriginCheck(URLRouter(websocket_urlpatterns))
log_redaction.install()  # tokens ride in query strings, which uvicorn logs
