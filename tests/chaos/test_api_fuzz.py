"""schemathesis against the HTTP API of a live server: every operation of /api/v1/openapi.json,
schema-valid and schema-invalid requests, then stateful scenarios along the schema's links, each
answer put through every check schemathesis has (not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance, response_headers_conformance,
positive_data_acceptance, negative_data_rejection, ignored_auth, use_after_free, ...).

Bounded: a fixed number of examples per operation and generation mode, derandomized, no shrinking
(each failing case is reported as found). Every request carries an API key with every scope, which
each operation that needs authentication accepts. Promise: no answer is a 5xx and every answer
matches the schema.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup

from tests.chaos.report import record
from tests.servers import NotifyServer, seed, server_environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES_PER_MODE = 20  # per operation, for valid and for invalid requests each
STATEFUL_SCENARIOS = 15
STATEFUL_STEPS = 6  # calls per scenario at most
FAILURES_SHOWN = 5
# Over the suite's few thousand requests the default limits would answer 429, which tells nothing.
UNLIMITED = {"TOKEN_RATE": "1000000/m", "INGEST_RATE": "1000000/s"}


def schemathesis_config(headers: dict[str, str]) -> SchemathesisConfig:
    """schemathesis' defaults, with ``headers`` on every request (its negative cases that drop
    one still drop it), and where they assume what the API does not promise:

    - 422 is an answer to schema-valid data: a valid body whose idempotency key an earlier case
      used with another body is refused with 422, as documented (a state conflict, like the 409
      the defaults list);
    - no NUL characters: JSON Schema cannot say "no NUL" of free-form objects (``data``, labels),
      which Postgres cannot store and the API refuses with 400 (tests/test_ingest_api.py and
      tests/test_tokens.py send them by hand);
    - no unknown query parameters: they are ignored, as by most HTTP APIs, and OpenAPI has no
      way to say a parameter list is closed.
    """
    return SchemathesisConfig.from_dict(
        {
            "headers": headers,
            "generation": {"allow-x00": False, "allow-extra-parameters": False},
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
                }
            },
        }
    )


def bounded(examples: int, **extra) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report what was found
        suppress_health_check=list(HealthCheck),
        **extra,
    )


def failure_kind(text: str) -> str:
    """The checks that failed and the status, from schemathesis' failure report."""
    lines = [line.strip() for line in text.splitlines()]
    checks = [line[2:] for line in lines if line.startswith("- ")]
    statuses = [line.split("]")[0] + "]" for line in lines if line.startswith("[")]
    answers = [line[:160] for line in lines if line.startswith("`")]
    return ", ".join(checks + statuses[:1] + answers[:1])


@dataclass
class Tally:
    """What the fuzzing sent and what came back."""

    operations: set[str] = field(default_factory=set)
    cases: int = 0
    stateful_steps: int = 0
    server_errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)  # distinct (operation, mode, check, status)

    def answered(self, label: str, status: int) -> None:
        self.operations.add(label)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 500:
            self.server_errors += 1

    def failed(self, label: str, mode: str, exc: BaseException) -> None:
        self.failures.append(f"{label} ({mode}): {exc}")
        self.kinds.add(f"{label} ({mode}): {failure_kind(str(exc))}")


@dataclass
class Live:
    server: NotifyServer
    headers: dict[str, str]

    def load(self) -> schemathesis.schemas.BaseSchema:
        url = f"{self.server.base}/api/v1/openapi.json"
        return schemathesis.openapi.from_url(url, config=schemathesis_config(self.headers))

    def check(self, case, tally: Tally, mode: str) -> None:
        """Send ``case``, count its answer, run every check on it (failures are kept)."""
        response = case.call(base_url=self.server.base, timeout=30)
        tally.answered(case.operation.label, response.status_code)
        try:
            case.validate_response(response, transport_kwargs={"base_url": self.server.base})
        except (FailureGroup, AssertionError) as exc:
            tally.failed(case.operation.label, mode, exc)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    directory: Path = tmp_path_factory.mktemp("api-fuzz")
    with server_environment(directory, "api_fuzz", **UNLIMITED) as env:
        people = seed(env)
        with NotifyServer(env, directory / "server.log") as server:
            yield Live(server, {"Authorization": f"Bearer {people['api_key']}"})


def fuzz_operation(operation, mode: GenerationMode, send: Callable) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @bounded(EXAMPLES_PER_MODE)
    def run(case) -> None:
        send(case)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to break in an operation without parameters or body (GET /csrf, /realtime/hub).
        assert mode == GenerationMode.NEGATIVE and not operation.body, operation.label


def report(name: str, tally: Tally, **figures) -> None:
    record(
        name,
        operations=len(tally.operations),
        cases=tally.cases,
        **figures,
        responses_5xx=tally.server_errors,
        failures=len(tally.failures),
        statuses=dict(sorted(tally.statuses.items())),
    )
    kinds = "\n".join(sorted(tally.kinds))
    shown = "\n\n".join(tally.failures[:FAILURES_SHOWN])
    assert tally.server_errors == 0 and not tally.failures, (
        f"{tally.server_errors} answers were 5xx, {len(tally.failures)} cases failed a check, "
        f"of these kinds:\n{kinds}\n\nthe first:\n\n{shown}"
    )


def test_every_operation_answers_valid_and_invalid_requests_as_its_schema_says(live):
    schema = live.load()
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            def send(case, mode=mode) -> None:
                tally.cases += 1
                live.check(case, tally, mode.value)

            fuzz_operation(operation, mode, send)
    assert tally.operations == {op.label for op in operations}, "every operation was called"
    report("schemathesis, every operation", tally)


def test_stateful_scenarios_along_the_links_answer_as_the_schema_says(live):
    schema = live.load()
    tally = Tally()
    base = schema.as_state_machine()
    assert base.bundles, "the schema has links between operations"

    class Scenarios(base):
        def get_call_kwargs(self, case) -> dict:
            return {"base_url": live.server.base, "timeout": 30}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            tally.cases += 1
            tally.stateful_steps += 1
            tally.answered(case.operation.label, response.status_code)
            try:
                super().validate_response(response, case, additional_checks, **kwargs)
            except (FailureGroup, AssertionError) as exc:
                tally.failed(case.operation.label, "stateful", exc)

    Scenarios.run(settings=bounded(STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS))
    links = sum(
        len(answer.get("links", {}))
        for item in schema.raw_schema["paths"].values()
        for operation in item.values()
        for answer in operation.get("responses", {}).values()
    )
    report("schemathesis, stateful along links", tally, links=links)
