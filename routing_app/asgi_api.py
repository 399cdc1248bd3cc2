"""A lean ASGI path for the ingest endpoints (``with_ingest_api`` wraps the project's HTTP app).

Why: for each request Django's ASGI handler opens a ``ThreadSensitiveContext`` (an executor and
OS thread of its own for the request's first thread-sensitive call), sends ``request_started`` and
``request_finished`` through ``sync_to_async`` (thread hops), and runs each ``MiddlewareMixin``
middleware's hooks through ``sync_to_async`` (two hops per middleware). With the project's eight
middleware that is about twenty thread hops and a thread start per request. Measured in-process
on this (contended, 2-core) machine: CPU per accepted single post fell from 7.5 to 4.9 ms, per
401 answer from 3.1 to 1.5 ms (before the other savings; bench/ingest.py has today's figures).

The ingest endpoints need none of it: a bearer key instead of sessions, cookies or CSRF, JSON
instead of pages, and their database work runs on ``db_threads``, which cleans its own
connections (what the request signals' ``close_old_connections`` is for). So their paths go to
``IngestASGIHandler``: Django's request, URL resolution, views and exception handling, with a
middleware chain of async-native CORS and security headers only, and without the request
signals, the per-request thread context and the disconnect watcher (an ingest request whose
client went away still finishes: its transaction commits or not as a whole).

Everything else (admin, dashboards, the realtime endpoints on the same API, the docs page) keeps
Django's full handler and middleware.
"""

from __future__ import annotations

import re
import time

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.urls import set_script_prefix
from django.utils.module_loading import import_string

from . import ingest_fast
from .allowed_hosts import host_allowed, refuse
from .metrics.instruments import INGEST_DURATION

# The ingest endpoints of routing_app.api (nothing else under /api/v1/ takes this path).
INGEST_PATH = re.compile(
    r"^/api/v1/(?:notifications(?:/batch)?|sources/[a-z]+|topics/[^/]+/notifications)/?\Z"
)


class SecurityHeadersMiddleware:
    """The headers Django's SecurityMiddleware adds to an API answer, without its thread hops."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request):
        response = await self.get_response(request)
        if settings.SECURE_CONTENT_TYPE_NOSNIFF:
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if settings.SECURE_REFERRER_POLICY:
            response.headers.setdefault("Referrer-Policy", settings.SECURE_REFERRER_POLICY)
        return response


INGEST_MIDDLEWARE = [
    "corsheaders.middleware.CorsMiddleware",
    "routing_app.asgi_api.SecurityHeadersMiddleware",
]


class IngestASGIHandler(ASGIHandler):
    """Django's ASGI handler with only ``INGEST_MIDDLEWARE`` (all async-native), no request
    signals, no per-request thread context (see the module docstring)."""

    async def __call__(self, scope: dict, receive, send) -> None:
        started = time.perf_counter()
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            request, error_response = self.create_request(scope, body_file)
            response = error_response or await self.run_get_response(request)
            await self.send_response(response, send)
        finally:
            body_file.close()
            INGEST_DURATION.observe(time.perf_counter() - started)

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = convert_exception_to_response(self._get_response_async)
        for path in reversed(INGEST_MIDDLEWARE):
            handler = convert_exception_to_response(import_string(path)(handler))
        self._middleware_chain = handler


def with_ingest_api(http_app):
    """ASGI ``http`` app: ingest endpoints to ``IngestASGIHandler`` (a well-formed single post to
    its fast path, ingest_fast.py), the rest to ``http_app``."""
    ingest = IngestASGIHandler()

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] == "http" and INGEST_PATH.match(scope["path"]):
            if not host_allowed(scope):  # Django's CommonMiddleware would have, via get_host
                return await refuse(scope, receive, send)
            if ingest_fast.takes(scope):
                return await ingest_fast.serve(ingest, scope, receive, send)
            return await ingest(scope, receive, send)
        return await http_app(scope, receive, send)

    return app
