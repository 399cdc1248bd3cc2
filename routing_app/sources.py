"""Source adapters: real payloads from other systems -> ``NotificationIn`` lists.

Pure functions: they validate the payload's shape (``SourceError`` with the JSON path of each bad
field, answered as 400) and map it; storing is ingest's job. Unknown extra fields are ignored, so a
newer sender version still gets through.

- Alertmanager webhook v4 (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config):
  one notification per alert; topic ``alerts.<alertname>`` (lowercased, other characters than
  ``a-z0-9_-`` become ``_``); event ``alert.firing`` / ``alert.resolved``; severity from
  ``labels.severity`` (see ``ALERT_SEVERITIES``; missing or unknown -> warning); idempotency key
  ``<fingerprint>:<status>:<startsAt>``, so Alertmanager's repeated sends of one alert state are
  stored once.
- Kubernetes (https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/): a
  core/v1 ``Event`` object, or what kubernetes-event-exporter's webhook sink posts (the same object
  plus ``clusterName`` and the involved object's labels/annotations; its ``layout`` option must be
  unset). Topic ``k8s.<namespace>.<kind>`` (cluster-scoped objects: namespace ``_cluster``, which
  no real namespace can be); event ``<kind>.<reason>``; ``Warning`` -> warning, else info;
  idempotency key ``<involvedObject.uid>:<reason>:<count>``.
- Workflow steps (ours; e.g. an Ash.Reactor step reported over HTTP): ``{workflow, step, status,
  duration_ms?, run_id?, attempt?, error?, data?}``; topic ``workflow.<workflow>``; event
  ``step.<status>``; failed -> error, compensated -> warning, else info; idempotency key
  ``<run_id>:<step>:<status>:<attempt>`` when ``run_id`` is given.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .ingest import IDEMPOTENCY_KEY_MAX_LENGTH, IngestError, NotificationIn
from .topics import TOPIC_MAX_LENGTH

# labels.severity values seen in the wild (lowercased) -> our severity
ALERT_SEVERITIES = {
    "critical": "critical",
    "crit": "critical",
    "page": "critical",
    "emergency": "critical",
    "fatal": "critical",
    "p0": "critical",
    "p1": "critical",
    "error": "error",
    "err": "error",
    "high": "error",
    "major": "error",
    "p2": "error",
    "warning": "warning",
    "warn": "warning",
    "medium": "warning",
    "minor": "warning",
    "p3": "warning",
    "info": "info",
    "informational": "info",
    "notice": "info",
    "low": "info",
    "none": "info",
    "p4": "info",
    "p5": "info",
    "debug": "debug",
}
DEFAULT_ALERT_SEVERITY = "warning"
CLUSTER_SCOPE = "_cluster"  # underscore: no Kubernetes namespace name can contain one
_UNSAFE = re.compile(r"[^a-z0-9_-]+")
# What the schema says of a name that becomes a topic segment: it holds a letter or a digit.
NAMEABLE_PATTERN = "[A-Za-z0-9]"


def _number_not_bool_or_text(value: Any) -> Any:
    # pydantic's lax mode takes true/false and "12" for numbers; JSON Schema's integer and
    # number do not (1.0 is an integer there, and here).
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number, not true, false or text")
    return value


JsonInt = Annotated[int, BeforeValidator(_number_not_bool_or_text)]


class SourceError(IngestError):
    """A payload that is not what the source sends; ``errors`` as in IngestError (400)."""


def topic_segment(value: str) -> str:
    """``value`` as one topic segment: lowercase, runs of other characters -> ``_``."""
    return _UNSAFE.sub("_", value.strip().lower()).strip("_")


def _topic(prefix: str, *segments: str) -> str:
    return ".".join([prefix, *segments])[:TOPIC_MAX_LENGTH]


def _idempotency_key(text: str) -> str:
    """``text`` as an idempotency key: itself when it fits, else its start and its SHA-256, so
    long sender fields (a fingerprint, a timestamp, a run id) never make a valid payload a 400
    and two long keys that share a start stay apart."""
    if len(text) <= IDEMPOTENCY_KEY_MAX_LENGTH:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[: IDEMPOTENCY_KEY_MAX_LENGTH - len(digest) - 1]}:{digest}"


def _validate(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise SourceError(
            [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)]
        ) from None


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- Alertmanager -----------------------------------------------------------------------------


class Alert(_Payload):
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(
        json_schema_extra={
            "required": ["alertname"],
            "properties": {"alertname": {"type": "string", "pattern": NAMEABLE_PATTERN}},
        }
    )
    annotations: dict[str, str] = {}
    startsAt: str
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = ""

    @field_validator("labels")
    @classmethod
    def _has_alertname(cls, labels: dict[str, str]) -> dict[str, str]:
        if not topic_segment(labels.get("alertname", "")):
            raise ValueError("needs an 'alertname' label with a letter or digit in it")
        return labels


class AlertmanagerWebhook(_Payload):
    """Alertmanager's webhook body, version 4."""

    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: str = ""
    groupKey: str = ""
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    externalURL: str = ""
    truncatedAlerts: JsonInt = 0
    alerts: list[Alert] = Field(min_length=1)


def alertmanager_notifications(hook: AlertmanagerWebhook) -> list[NotificationIn]:
    """One notification per alert of a validated webhook body."""
    items = []
    for alert in hook.alerts:
        alertname = alert.labels["alertname"]
        # Alertmanager's fingerprint is a hash of the label set; older senders lack it
        fingerprint = (
            alert.fingerprint
            or hashlib.sha256(json.dumps(alert.labels, sort_keys=True).encode()).hexdigest()[:16]
        )
        severity = ALERT_SEVERITIES.get(
            alert.labels.get("severity", "").strip().lower(), DEFAULT_ALERT_SEVERITY
        )
        items.append(
            NotificationIn(
                topic=_topic("alerts", topic_segment(alertname)),
                event=f"alert.{alert.status}",
                severity=severity,
                source="alertmanager",
                idempotency_key=_idempotency_key(f"{fingerprint}:{alert.status}:{alert.startsAt}"),
                data={
                    "alertname": alertname,
                    "status": alert.status,
                    "labels": alert.labels,
                    "annotations": alert.annotations,
                    "startsAt": alert.startsAt,
                    "endsAt": alert.endsAt,
                    "generatorURL": alert.generatorURL,
                    "fingerprint": fingerprint,
                    "receiver": hook.receiver,
                    "groupKey": hook.groupKey,
                    "externalURL": hook.externalURL,
                },
            )
        )
    return items


def from_alertmanager(payload: Any) -> list[NotificationIn]:
    """Map an Alertmanager webhook v4 body (parsed JSON); raise SourceError if malformed."""
    return alertmanager_notifications(_validate(AlertmanagerWebhook, payload))


# --- Kubernetes --------------------------------------------------------------------------------


class InvolvedObject(_Payload):
    kind: str = Field(min_length=1)
    name: str = ""
    namespace: str = ""
    uid: str = ""
    apiVersion: str = ""
    fieldPath: str = ""
    labels: dict[str, str] = {}  # kubernetes-event-exporter adds these


class EventSeries(_Payload):
    count: JsonInt = 0


class EventMeta(_Payload):
    name: str = ""
    namespace: str = ""
    uid: str = ""


class KubernetesEvent(_Payload):
    """A core/v1 Event, or kubernetes-event-exporter's webhook JSON (a superset)."""

    involvedObject: InvolvedObject
    reason: str = Field(min_length=1)
    message: str = ""
    type: str = Field("Normal", json_schema_extra={"enum": ["Normal", "Warning"]})
    count: JsonInt | None = None
    series: EventSeries | None = None
    metadata: EventMeta = EventMeta()
    source: dict[str, str] = {}
    firstTimestamp: str | None = None
    lastTimestamp: str | None = None
    eventTime: str | None = None
    reportingComponent: str = ""
    clusterName: str = ""

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ("Normal", "Warning"):
            raise ValueError("must be 'Normal' or 'Warning'")
        return value


def kubernetes_notifications(event: KubernetesEvent) -> list[NotificationIn]:
    obj = event.involvedObject
    namespace = obj.namespace or event.metadata.namespace
    kind = topic_segment(obj.kind) or "object"
    # events.k8s.io-style events count repeats in series.count and may leave count unset
    count = event.count or (event.series.count if event.series else 0) or 1
    uid = obj.uid or event.metadata.uid
    return [
        NotificationIn(
            topic=_topic("k8s", topic_segment(namespace) or CLUSTER_SCOPE, kind),
            event=f"{kind}.{topic_segment(event.reason) or 'event'}"[:100],
            severity="warning" if event.type == "Warning" else "info",
            source="k8s",
            idempotency_key=_idempotency_key(f"{uid}:{event.reason}:{count}") if uid else None,
            data={
                "cluster": event.clusterName,
                "namespace": namespace,
                "kind": obj.kind,
                "name": obj.name,
                "uid": uid,
                "fieldPath": obj.fieldPath,
                "reason": event.reason,
                "message": event.message,
                "type": event.type,
                "count": count,
                "firstTimestamp": event.firstTimestamp or event.eventTime,
                "lastTimestamp": event.lastTimestamp or event.eventTime,
                "source": event.source or {"component": event.reportingComponent},
                "labels": obj.labels,
            },
        )
    ]


def from_kubernetes(payload: Any) -> list[NotificationIn]:
    """Map a Kubernetes Event (or exporter JSON); raise SourceError if malformed."""
    return kubernetes_notifications(_validate(KubernetesEvent, payload))


# --- Workflow steps ---------------------------------------------------------------------------

WORKFLOW_SEVERITIES = {"started": "info", "succeeded": "info", "failed": "error"}
WORKFLOW_SEVERITIES["compensated"] = "warning"  # undone after a later step failed


class WorkflowStep(_Payload):
    """One step of a workflow run changed state."""

    workflow: str = Field(
        min_length=1,
        max_length=100,
        examples=["provision-cluster"],
        json_schema_extra={"pattern": NAMEABLE_PATTERN},
    )
    step: str = Field(min_length=1, max_length=100, examples=["create_vpc"])
    status: Literal["started", "succeeded", "failed", "compensated"]
    duration_ms: Annotated[float, Field(ge=0), BeforeValidator(_number_not_bool_or_text)] | None = (
        Field(None, description="how long the step ran")
    )
    run_id: str | None = Field(None, min_length=1, max_length=100)
    attempt: JsonInt = Field(1, ge=1)
    error: str | None = Field(None, max_length=2000)
    data: dict[str, Any] = {}

    @field_validator("workflow")
    @classmethod
    def _nameable(cls, value: str) -> str:
        if not topic_segment(value):
            raise ValueError("needs a letter or digit")
        return value


def workflow_notifications(step: WorkflowStep) -> list[NotificationIn]:
    key = f"{step.run_id}:{step.step}:{step.status}:{step.attempt}" if step.run_id else None
    return [
        NotificationIn(
            topic=_topic("workflow", topic_segment(step.workflow)),
            event=f"step.{step.status}",
            severity=WORKFLOW_SEVERITIES[step.status],
            source="workflow",
            idempotency_key=_idempotency_key(key) if key else None,
            data={
                "workflow": step.workflow,
                "step": step.step,
                "status": step.status,
                "duration_ms": step.duration_ms,
                "run_id": step.run_id,
                "attempt": step.attempt,
                "error": step.error,
                "data": step.data,
            },
        )
    ]


def from_workflow(payload: Any) -> list[NotificationIn]:
    """Map a workflow step report; raise SourceError if malformed."""
    return workflow_notifications(_validate(WorkflowStep, payload))
