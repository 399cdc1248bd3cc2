"""The project's HTTP API, mounted at ``/api/v1/`` (OpenAPI schema at ``/api/v1/openapi.json``,
docs page at ``/api/v1/docs``): one NinjaAPI holding the router's endpoints (``routing_app.api``)
and the realtime edge's (``channels_app.api``), and answering every error they raise in one shape,
``{"detail": str, "errors": [{"loc": [...], "msg": str}]}`` (``routing_app.api.error_response``).

Both apps only define Routers; mounting them here keeps the dependencies one way
(``channels_app`` -> ``routing_app``).
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.db import DataError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import HttpError, ValidationError

from channels_app.api import router as realtime_router
from channels_app.push_api import router as push_router
from routing_app import apikeys
from routing_app.api import RENDERER, error_response
from routing_app.api import router as ingest_router
from routing_app.delivery.api import router as delivery_router
from routing_app.ingest import IngestError

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="notify",
    version="1",
    description="Ingest notifications from sources and read topic history. "
    "Authenticate with `Authorization: Bearer <API key>`.",
    urls_namespace="api-v1",
    renderer=RENDERER,
)


def _strip_param_source(loc: tuple) -> list:
    # ninja: ("body", "<param name>", *path) for a body model; ("query", name) for the query
    if loc and loc[0] == "body":
        return list(loc[2:])
    return list(loc)


@api.exception_handler(ValidationError)
def _on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = [{"loc": _strip_param_source(tuple(e["loc"])), "msg": e["msg"]} for e in exc.errors]
    return error_response(request, 400, "the request is not valid; see errors", errors)


@api.exception_handler(IngestError)
def _on_ingest_error(request: HttpRequest, exc: IngestError) -> HttpResponse:
    detail = "the request is not valid; see errors"
    if exc.status == 422:
        detail = "the idempotency key was used before with a different body"
    return error_response(request, exc.status, detail, exc.errors)


@api.exception_handler(HttpError)
def _on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, ValueError):  # ninja: body parse failed
        errors = [{"loc": [], "msg": str(cause)}]
        return error_response(request, 400, "the body is not valid JSON", errors)
    return error_response(
        request, exc.status_code, exc.message, retry_after_s=getattr(exc, "retry_after_s", None)
    )


def _on_database_unreachable(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.warning("database unreachable: %s", exc)
    return error_response(
        request,
        503,
        "the database is unreachable; nothing was stored, retry later",
        retry_after_s=apikeys.UNAVAILABLE_RETRY_AFTER_S,
    )


api.add_exception_handler(OperationalError, _on_database_unreachable)
api.add_exception_handler(InterfaceError, _on_database_unreachable)


@api.exception_handler(RequestDataTooBig)
def _on_body_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error_response(request, 413, f"the body is larger than the limit of {limit} bytes")


@api.exception_handler(DataError)
def _on_data_error(request: HttpRequest, exc: DataError) -> HttpResponse:
    # The schemas refuse what the database cannot store; this answers what they still let by.
    log.warning("the database refused a value of %s %s: %s", request.method, request.path, exc)
    return error_response(
        request, 400, f"a value of the request cannot be stored or looked up: {exc}".strip()
    )


@api.exception_handler(SuspiciousOperation)
def _on_suspicious_request(request: HttpRequest, exc: SuspiciousOperation) -> HttpResponse:
    # What Django itself answers 400 to (a Host not in ALLOWED_HOSTS, a malformed multipart body).
    log.warning("suspicious request %s %s: %s", request.method, request.path, exc)
    return error_response(request, 400, f"the request was refused: {exc}")


@api.exception_handler(PermissionDenied)
def _on_permission_denied(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    return error_response(request, 403, str(exc) or "permission denied")


@api.exception_handler(Exception)
def _on_unexpected_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    """Any other error: logged with its traceback, answered in the API's JSON shape (never
    Django's HTML page), whatever DEBUG says."""
    log.error("%s %s failed", request.method, request.path, exc_info=exc)
    return error_response(
        request, 500, "the server failed to answer this request; the cause is in its log"
    )


api.add_router("", ingest_router)
api.add_router("", realtime_router)
api.add_router("", delivery_router)
api.add_router("", push_router)
