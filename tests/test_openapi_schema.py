"""/api/v1/openapi.json says what the API does: every status an operation answers, the constraints
it enforces, integers that are integers, and links from an answer to where its values are used."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.apiclient import bearer

SCHEMA_URL = "/api/v1/openapi.json"


@pytest.fixture(scope="module")
def schema(django_db_blocker) -> dict:
    with django_db_blocker.unblock():
        answer = Client().get(SCHEMA_URL)
    assert answer.status_code == 200
    return answer.json()


def statuses(schema: dict, method: str, path: str) -> set[str]:
    return set(schema["paths"][f"/api/v1{path}"][method]["responses"])


def body_schema(schema: dict, name: str) -> dict:
    return schema["components"]["schemas"][name]["properties"]


def test_every_status_the_realtime_endpoints_answer_is_listed(schema):
    assert {"200", "400", "401", "403", "404", "413", "415", "429"} <= statuses(
        schema, "post", "/tokens"
    )
    assert {"200", "400", "401", "403", "503"} <= statuses(
        schema, "get", "/topics/{topic}/presence"
    )
    assert {"200", "401"} <= statuses(schema, "get", "/realtime/hub")
    assert {"202", "400", "401", "403", "413", "415", "429", "503"} <= statuses(
        schema, "post", "/topics/{topic}/publish"
    )


def test_error_answers_have_the_documented_shape(schema):
    tokens = schema["paths"]["/api/v1/tokens"]["post"]["responses"]
    ref = tokens["404"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ErrorOut")
    assert {"detail", "errors"} <= set(schema["components"]["schemas"]["ErrorOut"]["properties"])


def test_topic_pattern_and_text_lengths_are_stated(schema):
    notification = body_schema(schema, "NotificationBody")
    assert notification["topic"]["pattern"] == r"^[a-z0-9_-]+(?:[.:][a-z0-9_-]+)*$"
    assert notification["topic"]["maxLength"] == 200
    assert notification["idempotency_key"]["maxLength"] == 200
    assert notification["event"]["maxLength"] == 100
    history = schema["paths"]["/api/v1/topics/{topic}/notifications"]["get"]["parameters"]
    [topic] = [p for p in history if p["name"] == "topic"]
    assert topic["schema"]["pattern"] == notification["topic"]["pattern"]
    assert body_schema(schema, "TokenBody")["user"]["maxLength"] == 150


def test_ingest_answers_link_to_the_history_and_the_delivery_detail(schema):
    operation_ids = {
        operation["operationId"] for item in schema["paths"].values() for operation in item.values()
    }
    single = schema["paths"]["/api/v1/notifications"]["post"]["responses"]["202"]["links"]
    assert single["history"]["parameters"] == {"topic": "$response.body#/topic"}
    assert single["later"]["parameters"] == {
        "topic": "$response.body#/topic",
        "after": "$response.body#/seq",
    }
    assert single["deliveries"]["parameters"] == {"notification_id": "$response.body#/id"}
    batch = schema["paths"]["/api/v1/notifications/batch"]["post"]["responses"]["202"]["links"]
    assert batch["history"]["parameters"] == {"topic": "$response.body#/results/0/topic"}
    for link in (*single.values(), *batch.values()):
        assert link["operationId"] in operation_ids


WORKFLOW = {"workflow": "deploy", "step": "build", "status": "started"}
KUBERNETES = {"involvedObject": {"kind": "Pod", "name": "api-1"}, "reason": "BackOff"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "payload", "loc"),
    [
        ("/sources/workflow", {**WORKFLOW, "duration_ms": False}, ["duration_ms"]),
        ("/sources/workflow", {**WORKFLOW, "attempt": True}, ["attempt"]),
        ("/sources/kubernetes", {**KUBERNETES, "series": {"count": False}}, ["series", "count"]),
        ("/sources/kubernetes", {**KUBERNETES, "count": "3"}, ["count"]),
    ],
)
async def test_true_false_and_text_are_not_numbers(api, ingest_key, path, payload, loc):
    answer = await api.post(f"/api/v1{path}", json=payload, headers=bearer(ingest_key))
    assert answer.status_code == 400, answer.text
    assert answer.json()["errors"][0]["loc"] == loc
    assert "JSON number" in answer.json()["errors"][0]["msg"]
