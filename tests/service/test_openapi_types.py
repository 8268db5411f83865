"""The JSON documents the service stores and answers are typed in its OpenAPI schema: a plan's result,
options and progress, a job's progress and result, a predictor's metrics, an agent task's payload,
progress and result. Real answers validate against the schema of their route, and give back every key
of the stored document as it was stored, older documents without newer keys included.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
from pydantic import BaseModel
from safetensors.torch import save
from sqlalchemy import update

from lpnet.gates import result as plan_result
from lpnet.predictor.metrics import AccuracyMetrics
from service.agents.verify import WAITING_FOR_AGENT
from service.config import FitSettings, Settings
from service.db.models import AgentTask, Job, Predictor, TaskKind
from service.job_handlers import default_registry
from service.jobs.kinds import JobKind
from service.jobs.worker import Worker
from service.main import create_app
from service.schemas.agent import TASK_PAYLOADS, TASK_RESULTS
from service.schemas.fits import AccuracyRead, FitJobResult
from service.schemas.jobs import JOB_RESULTS
from service.schemas.plan_results import (
    AllocationSummaryRead,
    CostSummaryRead,
    GroupPlanRead,
    LatencyEstimateRead,
    LayerPlanRead,
    PlanResultRead,
    VerificationRoundRead,
)
from service.testing.tiny import TinyProfile, tiny_module
from tests.service.support import Api, api_client
from tests.service.test_api_plans import budget_at, plan_request, run_plan

OpenApi = dict[str, Any]

# (schema, property) -> properties each of its object alternatives names (one set per alternative).
TYPED_DOCUMENTS: dict[tuple[str, str], list[set[str]]] = {
    ("PlanRead", "result"): [
        {"mode", "widths", "groups", "layers", "predicted", "unpruned_predicted", "min_achievable_ms"}
        | {"cost_before", "cost_after", "rounds", "met_budget", "capacity", "plan_seconds", "warnings"}
        | {"allocation", "pruned_network", "predictor_id"}
    ],
    ("PlanRead", "progress"): [{"phase", "percent", "eta_seconds", "message"}],
    ("PlanRead", "options"): [{"mode", "round_to", "verify", "model_id", "max_skew", "min_keep_ratio"}],
    ("JobRead", "progress"): [{"phase", "percent", "eta_seconds", "message"}],
    ("JobRead", "result"): [
        {"device_id", "samples", "seconds", "metrics", "training_fingerprint", "predictor_id", "version"},
        {"widths", "groups", "rounds", "predictor_id"},
        {"device", "profiled_seconds", "measured_this_run", "fit_seconds", "metrics", "version"},
        {"round", "rounds", "sampled_by_version", "metrics", "version"},
    ],
    ("PredictorRead", "metrics"): [{"lpnet", "baselines", "train_networks", "labels", "nominal_probe_ms"}],
    ("PredictorSummary", "metrics"): [{"lpnet", "baselines", "train_networks", "labels"}],
    ("AgentTaskRead", "payload"): [
        {"families", "kinds", "image_size", "budget_minutes", "fit_after"},
        {"architecture", "network_hash", "protocol"},
    ],
    ("AgentTaskRead", "result"): [
        {"measured", "failed", "skipped", "seconds", "rejected_batches", "fit"},
        {"measured_ms", "p10_ms", "p90_ms", "network_hash", "probe_ms", "relative_latency"},
    ],
    ("AgentTaskRead", "progress"): [{"measured", "failed", "elapsed_seconds", "percent", "phase"}],
}

# Each nested model of a plan's result and the `lpnet.gates.result` dataclass it mirrors.
MIRRORED = [
    (LatencyEstimateRead, plan_result.LatencyEstimate),
    (CostSummaryRead, plan_result.CostSummary),
    (GroupPlanRead, plan_result.GroupPlan),
    (LayerPlanRead, plan_result.LayerPlan),
    (VerificationRoundRead, plan_result.VerificationRound),
    (AllocationSummaryRead, plan_result.AllocationSummary),
]


@pytest.fixture(scope="module")
def openapi() -> OpenApi:
    document: OpenApi = create_app(Settings(database_url="sqlite://")).openapi()
    return document


def resolve(openapi: OpenApi, schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def alternatives(openapi: OpenApi, schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null schemas a value of `schema` may have, references resolved."""
    schema = resolve(openapi, schema)
    options: list[dict[str, Any]] = schema.get("anyOf") or schema.get("oneOf") or []
    if options:
        return [alternative for option in options for alternative in alternatives(openapi, option)]
    return [] if schema.get("type") == "null" else [schema]


def free_form(openapi: OpenApi, schema: dict[str, Any]) -> bool:
    """Whether `schema` says nothing of its value: any JSON, or an object without named properties."""
    options = alternatives(openapi, schema)
    if not options:
        return True
    for option in options:
        if not option or (option.get("type") == "object" and "properties" not in option):
            additional = option.get("additionalProperties", True)
            if additional is True or additional == {}:
                return True
    return False


def route_schema(openapi: OpenApi, path: str, method: str = "get", status: str = "200") -> dict[str, Any]:
    content = openapi["paths"][path][method]["responses"][status]["content"]
    schema: dict[str, Any] = content["application/json"]["schema"]
    return schema


def assert_valid(openapi: OpenApi, schema: dict[str, Any], answer: Any) -> None:
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": openapi["components"]})
    errors = [f"{list(error.instance_path)}: {error.message}" for error in validator.iter_errors(answer)]
    assert not errors, errors[:5]


def extras(model: Any, where: str = "") -> Iterator[str]:
    """Keys of a validated document that no field of its models names, at any depth."""
    if isinstance(model, BaseModel):
        for key in model.model_extra or {}:
            yield f"{where}.{key}"
        for name in type(model).model_fields:
            yield from extras(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list):
        for index, item in enumerate(model):
            yield from extras(item, f"{where}[{index}]")


def stored_job(api: Api, job_id: int) -> Job:
    with api.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


# The schema ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("owner", "field"), list(TYPED_DOCUMENTS))
def test_stored_documents_are_typed_objects_in_the_schema(openapi: OpenApi, owner: str, field: str) -> None:
    schema = openapi["components"]["schemas"][owner]["properties"][field]
    options = alternatives(openapi, schema)
    assert len(options) == len(TYPED_DOCUMENTS[owner, field]), [o.get("title") for o in options]
    for option, named in zip(options, TYPED_DOCUMENTS[owner, field], strict=True):
        assert option["type"] == "object" and named <= set(option["properties"]), option.get("title")
        untyped = [name for name, value in option["properties"].items() if free_form(openapi, value)]
        assert untyped == [], (option["title"], untyped)


def test_nested_documents_are_typed_down_to_their_leaves(openapi: OpenApi) -> None:
    schemas = openapi["components"]["schemas"]
    group = resolve(openapi, schemas["PlanResultRead"]["properties"]["groups"]["items"])
    assert {"kept", "pruning_ratio", "kept_indices", "scores"} <= set(group["properties"])
    network = alternatives(openapi, schemas["PlanResultRead"]["properties"]["pruned_network"])
    assert [set(option["properties"]) for option in network] == [
        {"ir_version", "name", "family", "input_shape", "layers", "outputs"}
    ]
    accuracy = alternatives(openapi, schemas["PredictorMetrics"]["properties"]["lpnet"])
    assert {"count", "within_10pct", "rmspe", "spearman", "interval_coverage"} <= set(
        accuracy[0]["properties"]
    )
    fit = alternatives(openapi, schemas["CampaignResultRead"]["properties"]["fit"])
    assert set(fit[0]["properties"]) == {"queued", "job_id", "reason"}


def test_the_plan_requests_mode_no_longer_offers_train(openapi: OpenApi) -> None:
    mode = resolve(openapi, openapi["components"]["schemas"]["PlanOptions"]["properties"]["mode"])
    assert mode["enum"] == ["architecture", "weights"]


@pytest.mark.parametrize(("model", "mirrored"), MIRRORED)
def test_plan_result_models_mirror_the_planners_dataclasses(model: type[BaseModel], mirrored: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(mirrored)}
    assert list(model.model_fields) == list(fields)
    for name, field in fields.items():
        has_default = (
            field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        )
        assert model.model_fields[name].is_required() == (not has_default), name


def test_every_kind_has_its_document_models() -> None:
    assert set(JOB_RESULTS) == {kind.value for kind in JobKind}
    assert set(TASK_PAYLOADS) == set(TASK_RESULTS) == {kind.value for kind in TaskKind}
    assert {f.name for f in dataclasses.fields(AccuracyMetrics)} | {"split", "model"} == set(
        AccuracyRead.model_fields
    )


def test_the_document_schemas_import_without_torch() -> None:
    # Command lines and request schemas read them without loading torch.
    modules = "service.schemas.plans, service.schemas.jobs, service.schemas.agent, service.schemas.devices"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# Real answers ------------------------------------------------------------------------------------------


def test_a_weights_plan_verified_on_the_device_answers_as_stored(
    migrated_url: str, tiny_profile: TinyProfile, openapi: OpenApi
) -> None:
    with api_client(migrated_url) as api:
        api.store_predictor(api.device_id, tiny_profile.fitted)
        weights = save({k: v.contiguous() for k, v in tiny_module().state_dict().items()})
        upload = api.post("/v1/models", files={"file": ("tiny.safetensors", weights)}, data={"name": "tiny"})
        assert upload.status_code == 201, upload.text
        options = {"mode": "weights", "model_id": upload.json()["id"], "verify": True}
        plan = run_plan(api, plan_request(tiny_profile, budget_at(tiny_profile, 0.6), **options), key="admin")
        assert plan["status"] == "succeeded", plan["error"]
        assert_valid(openapi, route_schema(openapi, "/v1/plans/{plan_id}"), plan)
        job = api.get(f"/v1/jobs/{plan['id']}", key="reader").json()
        assert_valid(openapi, route_schema(openapi, "/v1/jobs/{job_id}"), job)
        stored = stored_job(api, plan["id"])
    assert plan["result"] == job["result"] == stored.result
    assert plan["options"] == stored.input["options"] and plan["progress"] == stored.progress
    # The schema names every key the planner stores, at every depth.
    assert list(extras(PlanResultRead.model_validate(stored.result))) == []
    assert plan["result"]["verified"] is True and plan["result"]["rounds"][0]["timings_ms"]
    assert all(len(group["kept_indices"]) == group["kept"] for group in plan["result"]["groups"])


def test_a_plan_stored_before_newer_keys_existed_answers_without_them(
    api_with_predictor: Api, tiny_profile: TinyProfile, openapi: OpenApi
) -> None:
    api = api_with_predictor
    plan = run_plan(api, plan_request(tiny_profile, budget_at(tiny_profile, 0.5)))
    assert plan["status"] == "succeeded", plan["error"]
    # A result and options stored before keys were added ...
    older = {key: value for key, value in plan["result"].items() if key not in ("allocation", "warnings")}
    older["rounds"] = [
        {key: value for key, value in round_.items() if key not in ("timings_ms", "measured_raw_ms")}
        for round_ in older["rounds"]
    ]
    older["groups"] = [{k: v for k, v in group.items() if k != "scores"} for group in older["groups"]]
    # ... and an option stored before its bounds tightened (round_to is at most 256 now).
    older_options = {key: value for key, value in plan["options"].items() if key != "max_skew"}
    older_options["round_to"] = 512
    with api.factory() as session:
        session.execute(
            update(Job)
            .where(Job.id == plan["id"])
            .values(result=older, input={**stored_job(api, plan["id"]).input, "options": older_options})
        )
        session.commit()
    again = api.get(f"/v1/plans/{plan['id']}", key="reader")
    assert again.status_code == 200, again.text
    assert_valid(openapi, route_schema(openapi, "/v1/plans/{plan_id}"), again.json())
    assert again.json()["result"] == older
    assert again.json()["options"] == {k: v for k, v in older_options.items() if k != "round_to"}


def test_a_fit_job_and_its_predictor_answer_as_stored(
    migrated_url: str, tiny_profile: TinyProfile, openapi: OpenApi
) -> None:
    with api_client(migrated_url, fit=FitSettings(steps=120, members=2)) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        accepted = api.post(f"/v1/devices/{api.device_id}/predictors")
        assert accepted.status_code == 202, accepted.text
        assert Worker(api.factory, default_registry()).run_once() is not None
        job = api.get(accepted.json()["status_url"], key="reader").json()
        assert job["status"] == "succeeded", job["error"]
        assert_valid(openapi, route_schema(openapi, "/v1/jobs/{job_id}"), job)
        predictor = api.get(f"/v1/predictors/{job['result']['predictor_id']}", key="reader").json()
        assert_valid(openapi, route_schema(openapi, "/v1/predictors/{predictor_id}"), predictor)
        device = api.get(f"/v1/devices/{api.device_id}", key="reader").json()
        assert_valid(openapi, route_schema(openapi, "/v1/devices/{device}"), device)
        stored = stored_job(api, job["id"])
    assert stored.result is not None
    assert job["result"] == stored.result and job["progress"] == stored.progress
    assert predictor["metrics"] == device["predictor"]["metrics"] == stored.result["metrics"]
    assert list(extras(FitJobResult.model_validate(stored.result))) == []
    assert predictor["metrics"]["lpnet"]["count"] >= 1 and predictor["metrics"]["labels"] in ("ms", "probe")


def test_metrics_that_do_not_fit_their_types_are_left_out_not_fatal(
    api_with_predictor: Api, openapi: OpenApi
) -> None:
    # An imported artifact's header may hold anything; the answer keeps what fits and other keys.
    api = api_with_predictor
    predictor_id = api.extra["predictor_id"]
    odd = {"lpnet": {"count": "many", "rmspe": 0.25}, "labels": "seconds", "train_networks": 12, "note": [1]}
    with api.factory() as session:
        session.execute(update(Predictor).where(Predictor.id == predictor_id).values(metrics=odd))
        session.commit()
    answer = api.get(f"/v1/predictors/{predictor_id}", key="reader")
    assert answer.status_code == 200, answer.text
    assert_valid(openapi, route_schema(openapi, "/v1/predictors/{predictor_id}"), answer.json())
    assert answer.json()["metrics"] == {"lpnet": {"rmspe": 0.25}, "train_networks": 12, "note": [1]}


def test_a_campaign_task_answers_its_payload_progress_and_result(api: Api, openapi: OpenApi) -> None:
    campaign = {"families": ["resnet18"], "kinds": ["network"], "network_samples": 2, "fit_after": True}
    queued = api.post("/v1/devices/tiny-cpu/campaigns", json=campaign)
    assert queued.status_code == 202, queued.text
    assert_valid(
        openapi, route_schema(openapi, "/v1/devices/{device}/campaigns", "post", "202"), queued.json()
    )
    task = api.post("/v1/agent/tasks/lease", key="agent", json={"agent_id": "a1"}).json()
    progress = {"measured": 1, "failed": 0, "elapsed_seconds": 0.5, "percent": 50.0, "rates": [1.5]}
    beat = api.post(
        f"/v1/agent/tasks/{task['id']}/heartbeat", key="agent", json={"agent_id": "a1", "progress": progress}
    )
    assert beat.status_code == 200, beat.text
    assert_valid(openapi, route_schema(openapi, "/v1/agent/tasks/{task_id}/heartbeat", "post"), beat.json())
    assert beat.json()["progress"] == progress
    result = {"measured": 2, "failed": 0, "skipped": 0, "seconds": 1.5, "rejected_batches": 0}
    done = api.post(
        f"/v1/agent/tasks/{task['id']}/complete", key="agent", json={"agent_id": "a1", "result": result}
    )
    assert done.status_code == 200, done.text
    assert_valid(openapi, route_schema(openapi, "/v1/agent/tasks/{task_id}/complete", "post"), done.json())
    with api.factory() as session:
        stored = session.get(AgentTask, task["id"])
        assert stored is not None
        assert done.json()["payload"] == stored.payload and done.json()["result"] == stored.result
    assert done.json()["result"]["fit"]["queued"] is False and done.json()["result"]["fit"]["reason"]


def test_a_plan_waiting_for_an_agent_and_its_verify_task_answer_as_stored(
    api_with_predictor: Api, tiny_profile: TinyProfile, openapi: OpenApi
) -> None:
    api = api_with_predictor
    device_id, agent_key = api.add_device("remote-cpu", local=False)
    api.store_predictor(device_id, tiny_profile.fitted)
    request = {
        **plan_request(tiny_profile, budget_at(tiny_profile, 0.6), verify=True),
        "device": "remote-cpu",
    }
    plan_id = api.post("/v1/plans", key="reader", json=request).json()["job_id"]
    Worker(api.factory, default_registry()).run_once()
    plan = api.get(f"/v1/plans/{plan_id}", key="reader").json()
    assert plan["status"] == "running" and plan["progress"]["phase"] == WAITING_FOR_AGENT
    assert_valid(openapi, route_schema(openapi, "/v1/plans/{plan_id}"), plan)
    job = api.get(f"/v1/jobs/{plan_id}", key="reader").json()
    assert_valid(openapi, route_schema(openapi, "/v1/jobs/{job_id}"), job)
    assert plan["progress"] == job["progress"] == stored_job(api, plan_id).progress

    leased = api.post("/v1/agent/tasks/lease", key=agent_key, json={"agent_id": "r1"})
    assert leased.status_code == 200, leased.text
    assert_valid(openapi, route_schema(openapi, "/v1/agent/tasks/lease", "post"), leased.json())
    task = leased.json()
    assert task["kind"] == "verify" and set(task["payload"]) == {"architecture", "network_hash", "protocol"}
    result = {"measured_ms": 1.5, "network_hash": task["payload"]["network_hash"], "repetitions": 20}
    done = api.post(
        f"/v1/agent/tasks/{task['id']}/complete", key=agent_key, json={"agent_id": "r1", "result": result}
    )
    assert done.status_code == 200, done.text
    assert_valid(openapi, route_schema(openapi, "/v1/agent/tasks/{task_id}/complete", "post"), done.json())
    with api.factory() as session:
        stored = session.get(AgentTask, task["id"])
        assert stored is not None
        assert task["payload"] == stored.payload and done.json()["result"] == stored.result
