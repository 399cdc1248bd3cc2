"""Django URLs of the realtime edge. ``/events/<topic>/`` is served by ``sse.sse_app``, which
``notify_project.asgi`` routes before Django (``sse.with_sse``); the entry here gives the path its
name (``reverse("events", args=[topic])``) and answers 501 where that app is not in front."""

from django.urls import path

from . import sse

urlpatterns = [path(sse.SSE_PATH, sse.events_outside_asgi, name="events")]
