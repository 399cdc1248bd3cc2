"""ASGI entry point: HTTP goes to Django (SSE streams to channels_app.sse), WebSocket to
channels_app behind the origin check."""

import gc
import os

from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application
from django.core.exceptions import SuspiciousFileOperation
from django.http import Http404
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
django_asgi_app = get_asgi_application()  # sets Django up before importing consumers

from channels.routing import ProtocolTypeRouter  # noqa: E402

from channels_app.connect_rate import ConnectBuckets, limit_connects  # noqa: E402
from channels_app.routing import websocket_application  # noqa: E402
from channels_app.sse import with_sse  # noqa: E402
from routing_app.asgi_api import with_ingest_api  # noqa: E402


class StaticFiles(ASGIStaticFilesHandler):
    """Django's static files handler, where a path that leaves the static directories
    (``/static/../notify_project/settings.py``) is a 404, as any other missing file, not a 500
    (Django's ``safe_join`` raises SuspiciousFileOperation, which only Http404 would turn into an
    answer here)."""

    def serve(self, request):
        try:
            return super().serve(request)
        except SuspiciousFileOperation:
            raise Http404("no such static file") from None


# uvicorn serves no files: with DEBUG (the embedded mode) Django serves /static/ itself, so the
# admin has its CSS; in production a proxy serves STATIC_ROOT (README).
http_application = StaticFiles(django_asgi_app) if settings.DEBUG else django_asgi_app
# SSE streams (/events/<topic>/) are served before Django's handler, which would hold an OS thread
# per open stream (docs/sse.md, pitfall (a)).
# The ingest endpoints skip Django's sync middleware (routing_app/asgi_api.py: thread hops).
from routing_app.metrics import snapshot  # noqa: E402

snapshot.start_publisher()  # this host's figures for the dashboard and the alert rules
if not settings.REDIS_URL:
    # No Celery broker: this process sends the outbound deliveries itself (rows left from a
    # previous run too).
    from routing_app.delivery import embedded  # noqa: E402

    embedded.start()
# New WebSocket and SSE connections per client address are limited before anything else
# (channels_app/connect_rate.py); one set of buckets for both.
connects = ConnectBuckets()
application = ProtocolTypeRouter(
    {
        "http": limit_connects(with_sse(with_ingest_api(http_application)), connects),
        "websocket": limit_connects(websocket_application, connects),
    }
)

# What start-up made (Django, the URLconf and the API it imports, every module: ~150,000 objects)
# lives as long as the process; a full collection walked it all, about 75 ms on this machine, a
# pause for every connection of the process. Frozen, it is left out of collections: they walk
# only what requests and connections create.
get_resolver().url_patterns  # noqa: B018  (imports the URLconf now rather than at a first request)
gc.collect()
gc.freeze()
