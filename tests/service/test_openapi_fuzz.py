"""Schemathesis over the OpenAPI schema, against a live server on SQLite and on PostgreSQL.

Generated requests, each sent with an admin key, a reader key and no key, must never get a 5xx, a
status code or content type the schema does not document, or an answer slower than two seconds; a
request without a key must be refused with 401 whatever else it holds. A stateful run follows links
from answers to later requests (a created device to its pages, a queued plan to its status and model,
a created key to its revocation); the schema declares no links of its own, so this file adds them to
its copy.

Kept small for CI: a few examples per operation and a few short sequences, derandomized so that a
failure repeats, against a device with a real predictor, so that well-formed requests reach the
prediction and planning code and not only the validators. Schemathesis decides with a random draw of
its own (not Hypothesis') whether a step uses a linked value, so the stateful sequences can differ
between runs; the per-operation runs repeat exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import FirstRunSettings, Settings, WorkerSettings
from service.db.migrate import upgrade
from service.main import create_app
from service.testing.tiny import TinyProfile
from tests.conftest import fresh_postgres_database
from tests.service.conftest import serve_in_thread
from tests.service.support import api_client, feasible_budget

# Examples per operation and generation mode. Without a key every answer must be 401, so a few show it.
EXAMPLES = {"admin": 8, "reader": 6, "anonymous": 4}
STATEFUL_SEQUENCES = 25
STATEFUL_STEPS = 6
SLOWEST_ANSWER_S = 2.0
# A stalled request fails the check instead of hanging the run.
REQUEST_TIMEOUT_S = 10.0
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})

CREATED_DEVICE = ("/v1/devices", "post", "201")
QUEUED_PLAN = ("/v1/plans", "post", "202")
# (source path, method, status), (target path, method), parameters as OpenAPI runtime expressions.
LINKS: list[tuple[tuple[str, str, str], tuple[str, str], dict[str, str]]] = [
    (CREATED_DEVICE, ("/v1/devices/{device}", "get"), {"device": "$response.body#/name"}),
    *(
        (CREATED_DEVICE, target, {"device": "$response.body#/id"})
        for target in [
            ("/v1/devices/{device}/predictors", "get"),
            ("/v1/devices/{device}/predictors", "post"),
            ("/v1/devices/{device}/predictors/import", "post"),
            ("/v1/devices/{device}/profiles", "post"),
            ("/v1/devices/{device}/campaigns", "post"),
            ("/v1/devices/{device}/tasks", "get"),
        ]
    ),
    (QUEUED_PLAN, ("/v1/plans/{plan_id}", "get"), {"plan_id": "$response.body#/job_id"}),
    (QUEUED_PLAN, ("/v1/plans/{plan_id}/model", "get"), {"plan_id": "$response.body#/job_id"}),
    (QUEUED_PLAN, ("/v1/jobs/{job_id}", "get"), {"job_id": "$response.body#/job_id"}),
    (("/v1/keys", "post", "201"), ("/v1/keys/{prefix}", "delete"), {"prefix": "$response.body#/prefix"}),
]

Check = Callable[..., bool | None]

# Sequences follow links with well-formed requests, so that linked values (a plan's body, a device's id)
# reach the server as given; malformed requests are what the per-operation runs send.
STATEFUL_POSITIVE = schemathesis.Config.from_dict(
    {"phases": {"stateful": {"generation": {"mode": "positive"}}}}
)


def answers_in_time(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """The client's round trip, from sending the request to reading the answer, stays under the limit.

    A GET over the limit is sent once more: a stalled operation is slow again, while one answer held
    up by a burst of load on the machine is not. Other methods change state, so they get one try.
    """
    if response.elapsed <= SLOWEST_ANSWER_S:
        return None
    again = None
    if case.method.upper() == "GET":
        again = case.call(headers=dict(response.request.headers)).elapsed
        if again <= SLOWEST_ANSWER_S:
            return None
    retried = f", and {again:.2f} s when sent again" if again is not None else ""
    raise AssertionError(
        f"{case.operation.label} answered {response.status_code} after {response.elapsed:.2f} s{retried}; "
        f"the limit is {SLOWEST_ANSWER_S} s"
    )


def refuses_anonymous(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Without a key every API operation answers 401, before it looks at the body or the parameters."""
    if case.operation.path not in UNAUTHENTICATED_PATHS and response.status_code != 401:
        raise AssertionError(
            f"{case.operation.label} without a key answered {response.status_code}, not 401: "
            f"{response.text[:300]}"
        )
    return None


CHECKS: list[Check] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    answers_in_time,
]


def checks_for(role: str) -> list[Check]:
    return [*CHECKS, refuses_anonymous] if role == "anonymous" else CHECKS


def hypothesis_settings(**overrides: Any) -> settings:
    """Derandomized, so a failure in CI repeats on the next run and on a laptop."""
    return settings(
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        **overrides,
    )


def with_links(raw: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """A copy of the OpenAPI document with `LINKS` declared on the source operations' responses, and a
    link from the device list to a plan request with the body `plan`.

    Generated plan requests name devices that do not exist, so without that link no sequence would
    queue a plan and follow it to its status.
    """
    linked = copy.deepcopy(raw)
    paths = linked["paths"]

    def link(source: tuple[str, str, str], target: tuple[str, str], definition: dict[str, Any]) -> None:
        (path, method, status), (target_path, target_method) = source, target
        links = paths[path][method]["responses"][status].setdefault("links", {})
        links[f"{target_method.upper()} {target_path}"] = {
            "operationId": paths[target_path][target_method]["operationId"],
            **definition,
        }

    for source, target, parameters in LINKS:
        link(source, target, {"parameters": parameters})
    # The body replaces the generated one whole; merged field by field it would not be a valid request.
    link(
        ("/v1/devices", "get", "200"),
        ("/v1/plans", "post"),
        {"requestBody": plan, "x-schemathesis": {"merge_body": False}},
    )
    return linked


@dataclass(frozen=True)
class FuzzTarget:
    """A live server with a device that has a predictor, its schema (with links), and its keys."""

    schema: Any
    keys: dict[str, str]

    def headers(self, role: str) -> dict[str, str]:
        key = self.keys.get(role)
        return {} if key is None else {"Authorization": f"Bearer {key}"}


@contextmanager
def _database(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{(tmp_path_factory.mktemp('fuzz') / 'fuzz.db').as_posix()}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzz_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_profile: TinyProfile
) -> Iterator[FuzzTarget]:
    with _database(request.param, tmp_path_factory) as url:
        upgrade(url)
        with api_client(url) as api:
            api.store_measurements(api.device_id, tiny_profile.measurements)
            api.store_predictor(api.device_id, tiny_profile.fitted)
            app = create_app(
                Settings(
                    database_url=url,
                    worker=WorkerSettings(embedded=False),
                    first_run=FirstRunSettings(enabled=False),
                    max_request_bytes=2 * 1024 * 1024,
                )
            )
            with serve_in_thread(app) as base_url:
                raw = httpx.get(f"{base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
                plan = {
                    "device": api.device_name,
                    "architecture": tiny_profile.network.model_dump(mode="json"),
                    "budget_ms": feasible_budget(tiny_profile.fitted.artifact, tiny_profile.network, 0.5),
                }
                schema = schemathesis.openapi.from_dict(with_links(raw, plan), config=STATEFUL_POSITIVE)
                schema.config.update(base_url=base_url, request_timeout=REQUEST_TIMEOUT_S)
                yield FuzzTarget(schema, {"admin": api.keys.admin, "reader": api.keys.reader})


def _runs() -> list[Any]:
    """(path, method, mode, role) of each per-operation run.

    Negative mode only for operations that take input, and DELETE /v1/keys not with the admin key:
    revoking the run's own keys would lock it out (the stateful run revokes keys it created).
    """
    # The schema does not depend on the database: an app on an unopened in-memory URL lists them.
    paths = create_app(Settings(database_url="sqlite://")).openapi()["paths"]
    runs = []
    for path, methods in paths.items():
        for method, spec in methods.items():
            takes_input = bool(spec.get("parameters") or spec.get("requestBody"))
            modes = (
                [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
                if takes_input
                else [GenerationMode.POSITIVE]
            )
            for mode in modes:
                for role in EXAMPLES:
                    if not (role == "admin" and method == "delete"):
                        run_id = f"{method.upper()} {path} {mode.value} {role}"
                        runs.append(pytest.param(path, method, mode, role, id=run_id))
    return runs


@pytest.mark.parametrize(("path", "method", "mode", "role"), _runs())
def test_generated_requests_get_documented_answers(
    fuzz_target: FuzzTarget, path: str, method: str, mode: GenerationMode, role: str
) -> None:
    operation = fuzz_target.schema[path][method.upper()]
    headers = fuzz_target.headers(role)
    checks = checks_for(role)

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=EXAMPLES[role])
    def check(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=checks)

    check()


@pytest.mark.parametrize("role", ["admin", "reader"])
def test_linked_sequences_get_documented_answers(fuzz_target: FuzzTarget, role: str) -> None:
    """Sequences of calls where later requests use what earlier answers returned (ids, names, prefixes)."""
    headers = fuzz_target.headers(role)
    checks = checks_for(role)
    machine = fuzz_target.schema.as_state_machine()

    class Workflow(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": headers}

        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case,
            additional_checks: list[Check] | None = None,
            **kwargs: Any,
        ) -> None:
            case.validate_response(response, checks=checks, headers=headers)

    Workflow.run(
        settings=hypothesis_settings(max_examples=STATEFUL_SEQUENCES, stateful_step_count=STATEFUL_STEPS)
    )
