"""``GET /metrics``: this host's processes summed, in Prometheus' text format.

Protected: ``Authorization: Bearer <METRICS_TOKEN>`` (for Prometheus) or a staff session (for a
person in a browser); 401 otherwise (403 for a logged-in non-staff user).
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .files import HostCollector
from .state import StateCollector


def registry() -> CollectorRegistry:
    """A registry of everything this host exports (recorded and read at collection)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HostCollector())
    reg.register(StateCollector())
    return reg


REGISTRY = registry()


def _token_ok(request: HttpRequest) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expected = settings.METRICS_TOKEN
    return bool(
        expected and scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), expected)
    )


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not _token_ok(request):
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            response = HttpResponse(
                "send 'Authorization: Bearer <METRICS_TOKEN>' or log in as staff\n",
                status=401,
                content_type="text/plain",
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        if not user.is_staff:
            return HttpResponse(
                "only staff may read the metrics\n", status=403, content_type="text/plain"
            )
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
