"""Source adapters: real payloads (tests/payloads, see its README for where each comes from) map to
topics, events, severities and idempotency keys; malformed ones get 400 with the field's path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from routing_app.ingest import validate
from routing_app.models import Notification
from routing_app.sources import (
    SourceError,
    from_alertmanager,
    from_kubernetes,
    from_workflow,
)
from tests.apiclient import bearer, create_key

PAYLOADS = Path(__file__).parent / "payloads"


def payload(name: str) -> dict:
    return json.loads((PAYLOADS / f"{name}.json").read_text())


def summary(items) -> list[tuple]:
    return [(i.topic, i.event, i.severity, i.source, i.idempotency_key) for i in items]


# --- the pure mappings ----------------------------------------------------------------------


def test_alertmanager_firing_alert_maps_to_its_topic_event_severity_and_key():
    items = from_alertmanager(payload("alertmanager_firing_high_value"))

    assert summary(items) == [
        (
            "alerts.highvalue",
            "alert.firing",
            "error",  # labels.severity "high"
            "alertmanager",
            "948c667b1fc76492:firing:2022-10-04T13:32:56.014Z",
        )
    ]
    data = items[0].data
    assert data["annotations"]["summary"] == "poc_metric above 0.5"
    assert data["labels"]["instance"] == "api:8000"
    assert data["externalURL"] == "http://601cad658ee0:9093"
    assert validate(items[0]) == []


def test_long_sender_fields_give_a_valid_distinct_key_for_every_source():
    alerts = payload("alertmanager_firing_high_value")
    keys = []
    for long_start in ("2026-01-01T00:00:00Z" + "0" * 300, "2026-01-01T00:00:00Z" + "0" * 301):
        alerts["alerts"][0]["startsAt"] = long_start
        keys.append(from_alertmanager(alerts)[0])
    steps = [
        from_workflow({"workflow": "w", "step": "s" * 100, "status": "started", "run_id": run_id})[
            0
        ]
        for run_id in ("r" * 99 + "1", "r" * 99 + "2")
    ]
    for item in (*keys, *steps):
        assert validate(item) == [], item.idempotency_key
    assert keys[0].idempotency_key != keys[1].idempotency_key
    assert steps[0].idempotency_key != steps[1].idempotency_key


def test_alertmanager_alertname_with_spaces_becomes_one_topic_segment():
    [item] = from_alertmanager(payload("alertmanager_firing_instance_down"))

    assert item.topic == "alerts.instance_is_down"
    assert item.severity == "warning"  # no severity label: an alert is at least a warning
    assert item.data["alertname"] == "Instance Is Down"
    assert validate(item) == []


def test_alertmanager_resolved_alert_maps_to_alert_resolved():
    [item] = from_alertmanager(payload("alertmanager_resolved_deployment"))

    assert (item.topic, item.event, item.severity) == (
        "alerts.deployment",
        "alert.resolved",
        "warning",  # "Warning", any case
    )
    assert item.idempotency_key == "fbab788ec4c1018b:resolved:2022-07-29T11:13:27.3Z"
    assert item.data["endsAt"] == "2022-07-29T11:17:27.3Z"


def test_alertmanager_group_gives_one_notification_per_alert():
    hook = payload("alertmanager_firing_high_value")
    second = copy.deepcopy(hook["alerts"][0])
    second["labels"]["alertname"] = "DiskFull"
    second["fingerprint"] = "0000000000000001"
    hook["alerts"].append(second)

    assert [i.topic for i in from_alertmanager(hook)] == ["alerts.highvalue", "alerts.diskfull"]


def test_core_v1_event_maps_to_namespace_and_kind_topic():
    [item] = from_kubernetes(payload("k8s_event_core_v1_pulling"))

    assert summary([item]) == [
        (
            "k8s.default.pod",
            "pod.pulling",
            "info",
            "k8s",
            "47d965e6-4bb3-4c58-a089-1a8b16bf21b0:Pulling:1",
        )
    ]
    assert item.data["message"] == 'Pulling image "observiq/stanza:dev"'
    assert item.data["name"] == "stanza-g6rzd"
    assert validate(item) == []


def test_event_exporter_warning_maps_to_warning_with_object_labels():
    [item] = from_kubernetes(payload("k8s_event_exporter_backoff"))

    assert summary([item]) == [
        (
            "k8s.my-app.pod",
            "pod.backoff",
            "warning",
            "k8s",
            "11f86797-ded9-4e1f-be1e-582b4e8ebde8:BackOff:1",
        )
    ]
    assert item.data["labels"]["app"] == "my-app"


def test_repeated_kubernetes_event_gets_a_new_key_per_count():
    event = payload("k8s_event_exporter_backoff")
    event["count"] = 5
    [item] = from_kubernetes(event)
    assert item.idempotency_key.endswith(":BackOff:5")


def test_cluster_scoped_object_goes_to_the_cluster_topic():
    event = payload("k8s_event_core_v1_pulling")
    event["involvedObject"] = {"kind": "Node", "name": "worker-1", "uid": "n-1"}
    event["metadata"]["namespace"] = ""

    [item] = from_kubernetes(event)

    assert item.topic == "k8s._cluster.node"


@pytest.mark.parametrize(
    ("status", "severity"),
    [("started", "info"), ("succeeded", "info"), ("failed", "error"), ("compensated", "warning")],
)
def test_workflow_step_maps_status_to_event_and_severity(status, severity):
    step = {
        "workflow": "Provision Cluster",
        "step": "create_vpc",
        "status": status,
        "duration_ms": 1520.5,
        "run_id": "run-7",
    }

    [item] = from_workflow(step)

    assert summary([item]) == [
        (
            "workflow.provision_cluster",
            f"step.{status}",
            severity,
            "workflow",
            f"run-7:create_vpc:{status}:1",
        )
    ]
    assert item.data["duration_ms"] == 1520.5


def _without(data: dict, *path) -> dict:
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


def _with(data: dict, value, *path) -> dict:
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


AM = payload("alertmanager_firing_high_value")
K8S = payload("k8s_event_core_v1_pulling")
STEP = {"workflow": "deploy", "step": "migrate", "status": "failed"}


@pytest.mark.parametrize(
    ("adapter", "bad", "loc"),
    [
        (from_alertmanager, _without(AM, "alerts"), ["alerts"]),
        (from_alertmanager, _with(AM, [], "alerts"), ["alerts"]),
        (from_alertmanager, _with(AM, "3", "version"), ["version"]),
        (from_alertmanager, _with(AM, "burning", "alerts", 0, "status"), ["alerts", 0, "status"]),
        (
            from_alertmanager,
            _without(AM, "alerts", 0, "labels", "alertname"),
            ["alerts", 0, "labels"],
        ),
        (from_alertmanager, _without(AM, "alerts", 0, "startsAt"), ["alerts", 0, "startsAt"]),
        (from_alertmanager, [AM], []),
        (from_kubernetes, _without(K8S, "involvedObject"), ["involvedObject"]),
        (from_kubernetes, _without(K8S, "involvedObject", "kind"), ["involvedObject", "kind"]),
        (from_kubernetes, _without(K8S, "reason"), ["reason"]),
        (from_kubernetes, _with(K8S, "Fatal", "type"), ["type"]),
        (from_kubernetes, _with(K8S, "many", "count"), ["count"]),
        (from_workflow, _with(STEP, "paused", "status"), ["status"]),
        (from_workflow, _without(STEP, "step"), ["step"]),
        (from_workflow, _with(STEP, -1, "duration_ms"), ["duration_ms"]),
        (from_workflow, _with(STEP, "!!!", "workflow"), ["workflow"]),
    ],
)
def test_malformed_payload_is_refused_with_the_path_of_the_bad_field(adapter, bad, loc):
    with pytest.raises(SourceError) as exc:
        adapter(bad)
    assert exc.value.status == 400
    assert loc in [e["loc"] for e in exc.value.errors]


# --- over HTTP --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "name", "topic"),
    [
        ("alertmanager", "alertmanager_firing_high_value", "alerts.highvalue"),
        ("alertmanager", "alertmanager_firing_instance_down", "alerts.instance_is_down"),
        ("alertmanager", "alertmanager_resolved_deployment", "alerts.deployment"),
        ("kubernetes", "k8s_event_core_v1_pulling", "k8s.default.pod"),
        ("kubernetes", "k8s_event_exporter_backoff", "k8s.my-app.pod"),
    ],
)
async def test_real_payload_is_accepted_and_stored(api, ingest_key, path, name, topic):
    answer = await api.post(
        f"/api/v1/sources/{path}", json=payload(name), headers=bearer(ingest_key)
    )

    assert answer.status_code == 202, answer.text
    [result] = answer.json()["results"]
    assert (result["topic"], result["seq"], result["replayed"]) == (topic, 1, False)
    stored = await Notification.objects.select_related("topic").aget(pk=result["id"])
    assert stored.topic.name == topic


@pytest.mark.django_db(transaction=True)
async def test_workflow_step_is_accepted_and_stored(api, ingest_key):
    step = {**STEP, "duration_ms": 812, "run_id": "r1", "error": "lock timeout"}

    answer = await api.post("/api/v1/sources/workflow", json=step, headers=bearer(ingest_key))

    assert answer.status_code == 202, answer.text
    stored = await Notification.objects.aget(pk=answer.json()["results"][0]["id"])
    assert (stored.event, stored.severity, stored.data["error"]) == (
        "step.failed",
        "error",
        "lock timeout",
    )


@pytest.mark.django_db(transaction=True)
async def test_alertmanager_resending_an_alert_with_changed_annotations_stores_it_once(
    api, ingest_key
):
    hook = payload("alertmanager_firing_high_value")
    first = await api.post("/api/v1/sources/alertmanager", json=hook, headers=bearer(ingest_key))
    hook["alerts"][0]["annotations"]["summary"] = "poc_metric above 0.5 (now 0.93)"
    again = await api.post("/api/v1/sources/alertmanager", json=hook, headers=bearer(ingest_key))

    assert first.status_code == again.status_code == 202
    assert again.json()["results"][0]["id"] == first.json()["results"][0]["id"]
    assert again.json()["results"][0]["replayed"] is True
    assert await Notification.objects.acount() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "bad", "loc"),
    [
        ("alertmanager", _without(AM, "alerts"), ["alerts"]),
        ("alertmanager", _with(AM, "burning", "alerts", 0, "status"), ["alerts", 0, "status"]),
        ("kubernetes", _without(K8S, "reason"), ["reason"]),
        ("kubernetes", {"kind": "Event"}, ["involvedObject"]),
        ("workflow", _with(STEP, "paused", "status"), ["status"]),
    ],
)
async def test_malformed_payload_over_http_gets_400_and_stores_nothing(
    api, ingest_key, path, bad, loc
):
    answer = await api.post(f"/api/v1/sources/{path}", json=bad, headers=bearer(ingest_key))

    assert answer.status_code == 400, answer.text
    assert loc in [e["loc"] for e in answer.json()["errors"]]
    assert await Notification.objects.acount() == 0


@pytest.mark.django_db(transaction=True)
async def test_key_limited_to_other_sources_gets_403_on_a_source_endpoint(api):
    _, raw = await sync_to_async(create_key)("k8s-only", allowed_sources=["k8s"])

    answer = await api.post(
        "/api/v1/sources/alertmanager",
        json=payload("alertmanager_firing_high_value"),
        headers=bearer(raw),
    )

    assert answer.status_code == 403
    assert "alertmanager" in answer.json()["detail"]
