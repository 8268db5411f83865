"""A client generated from the served `/openapi.json` by openapi-python-client sees the stored documents
as typed classes: a plan's result down to its layers, a job's progress and result, a predictor's
metrics, an agent task's payload and progress. Generated into a scratch directory and used against a
real server on loopback.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from lpnet.arch.groups import channel_layout
from service.auth import create_api_key
from service.db.models import Device, KeyScope
from service.testing.tiny import TinyProfile
from tests.service.test_api_plans import budget_at
from tests.service.test_client import LiveServer, Served, served

# The generated package's name; unlike the document's title (lpnet), it cannot shadow the library.
PACKAGE = "lpnet_generated_client"
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture
def server(sqlite_migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer) -> Iterator[Served]:
    with served(sqlite_migrated_url, tiny_profile, live_server) as running:
        yield running


@pytest.fixture
def generated(server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The client package generated from the running server's OpenAPI document, imported."""
    document = tmp_path / "openapi.json"
    document.write_text(httpx.get(f"{server.url}/openapi.json", timeout=30).text)
    config = tmp_path / "generator.json"
    # The generator's own post hooks look for `ruff` on PATH; it is run below from this environment.
    config.write_text(json.dumps({"package_name_override": PACKAGE, "post_hooks": []}))
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document)]
    command += ["--meta", "none", "--output-path", str(tmp_path / PACKAGE), "--config", str(config)]
    for step in (command, [sys.executable, "-m", "ruff", "format", "--no-cache", str(tmp_path / PACKAGE)]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def endpoint(package: ModuleType, tag: str, operation: str) -> Any:
    """The generated module of one operation (its `sync` and `sync_detailed`)."""
    return importlib.import_module(f"{package.__name__}.api.{tag}.{operation}")


def client(package: ModuleType, server: Served, key: str) -> Any:
    return package.AuthenticatedClient(base_url=server.url, token=server.keys.get(key, key), timeout=60.0)


def agent_key(server: Served) -> str:
    with server.factory() as session:
        device = session.get(Device, server.device_id)
        key = create_api_key(session, scope=KeyScope.AGENT.value, device=device)[1]
        session.commit()
    return key


def test_a_latency_a_plan_its_job_and_the_predictor_read_as_generated_classes(
    server: Served, generated: ModuleType, tiny_profile: TinyProfile
) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    network = tiny_profile.network.model_dump(mode="json")
    with client(generated, server, "reader") as reader:
        request = models.LatencyRequest.from_dict({"device": "tiny-cpu", "architecture": network})
        latency = endpoint(generated, "latency", "predict_latency_v1_latency_post").sync(
            client=reader, body=request
        )
        assert isinstance(latency, models.LatencyRead), latency
        assert latency.network_hash == tiny_profile.network.content_hash
        assert isinstance(latency.total_ms, float) and latency.low_ms <= latency.total_ms <= latency.high_ms
        assert all(isinstance(layer, models.LayerLatency) for layer in latency.per_layer)

        budget = budget_at(tiny_profile, 0.5)
        body = models.PlanCreate.from_dict(
            {"device": "tiny-cpu", "architecture": network, "budget_ms": budget}
        )
        accepted = endpoint(generated, "plans", "create_plan_v1_plans_post").sync(client=reader, body=body)
        assert isinstance(accepted, models.JobAccepted), accepted
        plan = wait_for_plan(generated, reader, accepted.job_id)
        job = endpoint(generated, "jobs", "get_job_route_v1_jobs_job_id_get").sync(
            job_id=accepted.job_id, client=reader
        )
        predictor = endpoint(
            generated, "predictors", "get_predictor_route_v1_predictors_predictor_id_get"
        ).sync(predictor_id=server.predictor_id, client=reader)

    assert isinstance(plan, models.PlanRead) and plan.status == models.JobStatus.SUCCEEDED, plan.error
    result = plan.result
    assert isinstance(result, models.PlanResultRead)
    assert isinstance(result.predicted, models.LatencyEstimateRead)
    assert isinstance(result.predicted.total_ms, float) and result.predicted.total_ms <= budget
    assert len(result.groups) == len(channel_layout(tiny_profile.network).groups)
    assert all(isinstance(group, models.GroupPlanRead) for group in result.groups)
    assert [group.kept for group in result.groups] == result.widths
    assert all(isinstance(layer, models.LayerPlanRead) for layer in result.layers)
    ratios = [layer.pruning_ratio for layer in result.layers]
    assert all(isinstance(ratio, float) and 0.0 <= ratio < 1.0 for ratio in ratios) and max(ratios) > 0.0
    assert isinstance(result.cost_after, models.CostSummaryRead) and result.cost_after.macs > 0
    assert all(isinstance(round_, models.VerificationRoundRead) for round_ in result.rounds)
    assert isinstance(plan.options, models.PlanOptionsRead)
    assert isinstance(plan.progress, models.JobProgress) and isinstance(plan.progress.phase, str)

    assert isinstance(job, models.JobRead) and job.kind == "plan"
    assert isinstance(job.result, models.PlanResultRead) and job.result.widths == result.widths
    assert isinstance(job.progress, models.JobProgress) and job.progress.phase == plan.progress.phase

    assert isinstance(predictor, models.PredictorRead)
    metrics = predictor.metrics
    assert isinstance(metrics, models.PredictorMetrics)
    assert isinstance(metrics.lpnet, models.AccuracyRead) and metrics.lpnet.count >= 1
    assert isinstance(metrics.lpnet.rmspe, float)
    assert metrics.baselines and all(isinstance(row, models.AccuracyRead) for row in metrics.baselines)
    assert metrics.to_dict() == tiny_profile.fitted.metrics


def wait_for_plan(package: ModuleType, reader: Any, plan_id: int, timeout: float = 120.0) -> Any:
    get_plan = endpoint(package, "plans", "get_plan_route_v1_plans_plan_id_get")
    deadline = time.monotonic() + timeout
    while True:
        plan = get_plan.sync(plan_id=plan_id, client=reader)
        if plan.status.value in FINISHED or time.monotonic() > deadline:
            return plan
        time.sleep(0.1)


def test_an_agent_task_reads_as_generated_classes_and_its_progress_is_checked(
    server: Served, generated: ModuleType
) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    campaign = models.CampaignCreate.from_dict(
        {"families": ["resnet18"], "kinds": ["network"], "quick": True}
    )
    heartbeat = endpoint(generated, "agent", "heartbeat_v1_agent_tasks_task_id_heartbeat_post")
    with client(generated, server, "admin") as admin, client(generated, server, agent_key(server)) as agent:
        queued = endpoint(generated, "agent", "create_campaign_v1_devices_device_campaigns_post").sync(
            device="tiny-cpu", client=admin, body=campaign
        )
        assert isinstance(queued, models.AgentTaskRead), queued
        task = endpoint(generated, "agent", "lease_v1_agent_tasks_lease_post").sync(
            client=agent, body=models.TaskLeaseRequest(agent_id="a1")
        )
        assert isinstance(task, models.AgentTaskRead) and task.id == queued.id
        assert isinstance(task.payload, models.CampaignPayload) and task.payload.families == ["resnet18"]

        progress = models.HeartbeatProgress(measured=3, failed=1, elapsed_seconds=2.5, percent=60.0)
        progress.additional_properties["rates"] = [1.5, 2.0]  # an agent may add keys of its own
        beat = heartbeat.sync(
            task_id=task.id, client=agent, body=models.TaskHeartbeat("a1", progress=progress)
        )
        assert isinstance(beat, models.AgentTaskRead), beat
        assert isinstance(beat.progress, models.AgentTaskProgress)
        assert (beat.progress.measured, beat.progress.failed, beat.progress.percent) == (3, 1, 60.0)
        assert beat.progress.additional_properties == {"rates": [1.5, 2.0]}

        # The generated classes do not check values; the server does, and names the field.
        for field, value in [("percent", 150.0), ("measured", "many"), ("network_hash", "abc")]:
            bad = models.HeartbeatProgress.from_dict({field: value})
            refused = heartbeat.sync_detailed(
                task_id=task.id, client=agent, body=models.TaskHeartbeat("a1", progress=bad)
            )
            assert refused.status_code == 422 and isinstance(refused.parsed, models.ErrorResponse)
            errors = refused.parsed.error.details.additional_properties["errors"]
            assert [error["field"] for error in errors] == [f"body.progress.{field}"], errors
        kept = endpoint(generated, "agent", "get_device_tasks_v1_devices_device_tasks_get").sync(
            device="tiny-cpu", client=admin
        )
    [listed] = kept.items
    assert isinstance(listed.progress, models.AgentTaskProgress) and listed.progress.measured == 3
