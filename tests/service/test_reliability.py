"""Failures on a real PostgreSQL with real processes: a worker killed mid-plan, a database restart under
load, 20 agents submitting at once. The scenarios live in service/testing/; bench/reliability.py runs
them larger.

One `lpnet serve` process (no embedded worker) on a fresh database serves every test of this module;
each test registers devices of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lpnet.arch.from_torch import network_from_torchvision
from lpnet.arch.groups import apply_width_vector, channel_layout
from lpnet.gates.budget import width_grid
from lpnet.predictor.artifact import load_predictor
from service.testing.db_restart import postgres_restart_under_load
from service.testing.postgres import PostgresCluster
from service.testing.processes import Processes, ServedApi, running_api
from service.testing.stored import store_device_predictor
from service.testing.submitters import concurrent_submitters
from service.testing.tiny import TinyProfile
from service.testing.worker_kill import worker_kill
from tests.conftest import fresh_postgres_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def processes(workdir: Path) -> Iterator[Processes]:
    with Processes(workdir / "logs") as started:
        yield started


@pytest.fixture(scope="module")
def served(processes: Processes, workdir: Path) -> Iterator[ServedApi]:
    with fresh_postgres_database() as url, running_api(processes, url, workdir / "data") as api:
        yield api


def test_a_plan_survives_its_worker_being_killed(
    served: ServedApi, processes: Processes, workdir: Path, tiny_profile: TinyProfile
) -> None:
    device_id, _ = served.register_device("kill-cpu", tiny_profile.context)
    predictor_id = store_device_predictor(served.database_url, device_id, tiny_profile.fitted)
    # resnet18 at 64x64: a plan of a few seconds (12 channel groups), long enough to be killed in.
    network = network_from_torchvision("resnet18", (1, 3, 64, 64))
    predictor = load_predictor(tiny_profile.fitted.artifact)
    full_ms = predictor.predict(network).total_ms
    # Halfway between the narrowest network the plan may reach and the full one: a budget that needs
    # pruning and can be met, whatever the tiny profile's predictor makes of resnet18's per-layer cost.
    narrowest = width_grid(channel_layout(network)).min_widths
    min_ms = predictor.predict(apply_width_vector(network, narrowest)).total_ms
    budget_ms = (min_ms + full_ms) / 2
    request = {
        "device": "kill-cpu",
        "architecture": {"torchvision": "resnet18", "input_shape": [1, 3, 64, 64]},
        "budget_ms": budget_ms,
    }
    outcome = worker_kill(served, processes, workdir / "data", request, lease_seconds=2.0)

    assert outcome["status_when_killed"] == "running", outcome
    assert outcome["progress_when_killed"]["phase"] == "planning"
    assert outcome["killed_worker_pid"] in outcome["worker_pids"]
    assert outcome["survivor_worker_pid"] in outcome["worker_pids"]
    assert outcome["survivor_worker_pid"] != outcome["killed_worker_pid"]
    job = outcome["job"]
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    result = outcome["plan"]["result"]
    assert result["predictor_id"] == predictor_id
    assert result["predicted"]["total_ms"] <= budget_ms
    assert len(result["widths"]) == len(channel_layout(network).groups) == 12
    assert len(result["layers"]) == len(network.layers) and result["pruned_network"]["layers"]
    # The survivor stops cleanly on SIGTERM.
    assert outcome["survivor_exit_code"] == 0


def test_the_api_recovers_from_a_postgres_restart_and_stores_every_batch_once(
    served: ServedApi, workdir: Path, tiny_profile: TinyProfile
) -> None:
    cluster = PostgresCluster.find()
    if cluster is None:
        message = "pg_ctlcluster (and one cluster under /etc/postgresql) is needed to restart PostgreSQL"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        outcome = postgres_restart_under_load(
            served,
            cluster,
            tiny_profile.context,
            tiny_profile.measurements,
            workdir / "restart",
            clients=3,
            batches_per_client=8,
            batch_rows=5,
        )
    finally:
        cluster.ensure_running()

    assert outcome["postmaster_restarted"], "PostgreSQL was not restarted"
    assert outcome["seconds_restart_done_to_ready"] is not None, "/readyz never answered 200 again"
    assert outcome["client_errors"] == []
    assert outcome["batches_stored_before_restart"] < outcome["batches_submitted"]
    assert outcome["batches_missing"] == 0 and outcome["batches_unexpected"] == 0
    assert outcome["batches_stored"] == outcome["batches_submitted"] == 24
    assert outcome["rows_missing"] == 0 and outcome["rows_duplicated"] == 0
    assert outcome["rows_stored"] == outcome["rows_submitted"] == 120
    with httpx.Client(timeout=5) as client:
        assert client.get(f"{served.base_url}/readyz").status_code == 200
    # While the database was down the API answered 503 (retry), never 500 (a bug).
    assert set(outcome["responses"]) <= {"201", "503"}, outcome["responses"]


def test_twenty_agents_submitting_at_once_store_every_row_once(
    served: ServedApi, tiny_profile: TinyProfile
) -> None:
    outcome = concurrent_submitters(
        served,
        tiny_profile.context,
        tiny_profile.measurements,
        agents=20,
        batches_per_agent=4,
        batch_rows=10,
        overlap=5,
    )

    assert outcome["errors"] == []
    assert outcome["threads"] == 40 and outcome["batches_submitted"] == 80
    assert outcome["batches_stored"] == 80
    # Each key was stored by exactly one of the racing posts; the others were replays.
    assert outcome["batches_stored_fresh_more_than_once"] == 0
    assert outcome["batches_never_stored_fresh"] == 0
    assert outcome["replays_not_marked"] == 0 and outcome["replays_with_another_answer"] == 0
    assert outcome["rows_stored"] == outcome["rows_submitted"] == 20 * 25
    assert outcome["rows_stored_by_answers"] == outcome["rows_submitted"]
    assert outcome["rows_duplicated"] == 0
