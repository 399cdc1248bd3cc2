"""WebSocket routing. Consumers come with the realtime issue; until then every socket is refused."""

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import OriginValidator
from django.conf import settings

websocket_urlpatterns: list = []

websocket_application = OriginValidator(
    AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    [origin for origin in settings.NOTIFY_ALLOWED_ORIGINS]
    + ["http://127.0.0.1", "http://localhost"],
)
