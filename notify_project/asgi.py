"""ASGI entry point: HTTP goes to Django, WebSocket to channels_app behind the origin check."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
django_asgi_app = get_asgi_application()  # sets Django up before importing consumers

from channels.routing import ProtocolTypeRouter  # noqa: E402

from channels_app.routing import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})
