"""Schemathesis over the OpenAPI schema: generated requests never get a 500 or an undocumented answer.

Kept small for CI: a few examples per operation, against an app whose device has a real predictor, so
well-formed requests reach the prediction and planning code and not only the validators.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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

from service.config import Settings
from service.db.migrate import upgrade
from service.main import create_app
from tests.service.support import Api, TinyProfile, api_client

EXAMPLES_PER_OPERATION = 8
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory: pytest.TempPathFactory, tiny_profile: TinyProfile) -> Iterator[Api]:
    url = f"sqlite:///{(tmp_path_factory.mktemp('fuzz') / 'fuzz.db').as_posix()}"
    upgrade(url)
    with api_client(url, max_request_bytes=2 * 1024 * 1024) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        yield api


@pytest.fixture(scope="module")
def api_schema(fuzz_api: Api) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_api.app)


def _operations() -> list[tuple[str, str]]:
    # The schema does not depend on the database: an app on an unopened in-memory URL lists them.
    paths = create_app(Settings(database_url="sqlite://")).openapi()["paths"]
    return [(path, method) for path, methods in paths.items() for method in methods if method != "delete"]


def _has_inputs(api_schema: Any, path: str, method: str) -> bool:
    spec = api_schema.raw_schema["paths"][path][method]
    return bool(spec.get("parameters") or spec.get("requestBody"))


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
@pytest.mark.parametrize(("path", "method"), _operations())
def test_generated_requests_get_documented_answers(
    api_schema: Any, fuzz_api: Api, path: str, method: str, mode: GenerationMode
) -> None:
    """DELETE /v1/keys is left out: revoking keys would lock the fuzzer out (it has its own tests)."""
    if mode is GenerationMode.NEGATIVE and not _has_inputs(api_schema, path, method):
        pytest.skip("nothing to send wrong: the operation takes no input")
    operation = api_schema[path][method.upper()]
    headers = {"Authorization": f"Bearer {fuzz_api.keys.admin}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    check()
