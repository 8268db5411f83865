"""The first run's refining: rounds of profiling where the predictor is unsure, each storing a version.

On a real SQLite database the tiny device of the service tests stands in for this machine, with its
real measurements and its predictor as version 1. The rounds time real generated networks with the
quick timing protocol for a few seconds each, and refit with a short fit.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from sqlalchemy import func, select

from lpnet.arch.generator import generate_network
from lpnet.predictor.artifact import load_predictor
from lpnet.predictor.features import tensorize
from lpnet.predictor.model import member_log_spread
from service.cli import main as cli_main
from service.config import FirstRunSettings, FitSettings, Settings, get_settings
from service.db.models import Job, JobStatus, NetworkMeasurement, Predictor, ProfileRun
from service.first_run.bootstrap import start_first_run
from service.job_handlers import serving_registry
from service.jobs.kinds import JobKind
from service.jobs.queue import enqueue
from service.jobs.worker import Worker
from service.testing.tiny import TinyProfile
from tests.service.support import Api, api_client

DEVICE = "tiny-cpu"
# One worker process, as `lpnet serve` runs them, that takes one job and stops.
WORKER_PROCESS = (
    "import sys\n"
    "from service.db.session import make_engine, make_session_factory\n"
    "from service.job_handlers import serving_registry\n"
    "from service.jobs.worker import Worker\n"
    "Worker(make_session_factory(make_engine(sys.argv[1])), serving_registry()).run_once()\n"
)


def first_run_settings(url: str, refine_minutes: float = 0.1, rounds: int = 2) -> Settings:
    """Refining in rounds of a few seconds over generated networks at a loose timing protocol."""
    first_run = FirstRunSettings(
        enabled=True,
        device_name=DEVICE,
        families=["generated"],
        kinds=["network"],
        image_size=32,
        quick_protocol=True,
        fit=FitSettings(steps=60, members=2),
        refine_minutes=refine_minutes,
        refine_rounds=rounds,
    )
    return Settings(database_url=url, first_run=first_run)


@pytest.fixture
def ready_device(sqlite_migrated_url: str, tiny_profile: TinyProfile) -> Iterator[Api]:
    """The tiny local device with its measurements and predictor version 1, as a first run leaves it."""
    with api_client(sqlite_migrated_url) as api:
        api.store_measurements(api.device_id, tiny_profile.measurements)
        api.store_predictor(api.device_id, tiny_profile.fitted)
        yield api


def _status(api: Api) -> dict[str, Any]:
    response = api.get(f"/v1/devices/{DEVICE}")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()["status"]
    return status


def _latency_version(api: Api, tiny_profile: TinyProfile) -> int:
    architecture = tiny_profile.network.model_dump(mode="json")
    response = api.post("/v1/latency", json={"device": DEVICE, "architecture": architecture})
    assert response.status_code == 200, response.text
    return int(response.json()["predictor"]["version"])


def _versions(api: Api) -> list[int]:
    with api.factory() as session:
        return list(session.scalars(select(Predictor.version).order_by(Predictor.version)))


def _network_rows(api: Api) -> dict[int, str]:
    """Every network measurement of the device: id -> sample key."""
    with api.factory() as session:
        rows = session.execute(select(NetworkMeasurement.id, NetworkMeasurement.sample_key)).all()
        return {row.id: row.sample_key for row in rows}


def _jobs(api: Api, kind: str) -> list[Job]:
    with api.factory() as session:
        jobs = list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))
        session.expunge_all()
        return jobs


def _wait_until(condition: Callable[[], bool], timeout_s: float, describe: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, describe
        time.sleep(0.1)


def _device_list(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str) -> str:
    """The device's line of `lpnet device list`."""
    monkeypatch.setenv("LPNET_DATABASE_URL", url)
    get_settings.cache_clear()
    capsys.readouterr()
    assert cli_main(["device", "list"]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith(DEVICE))


def _kill_a_worker_mid_round(api: Api, url: str) -> tuple[dict[int, str], int]:
    """Run a worker process until the round has measured a network, then kill it.

    Returns:
        The network measurements stored since it started (id -> sample key), and its pid.
    """
    before = _network_rows(api)
    child = subprocess.Popen([sys.executable, "-c", WORKER_PROCESS, url])
    try:
        _wait_until(lambda: len(_network_rows(api)) > len(before), 120, "the round measured nothing")
    finally:
        child.kill()
        child.wait(timeout=10)
    return {row_id: key for row_id, key in _network_rows(api).items() if row_id not in before}, child.pid


def _run_the_jobs_reading_the_status(api: Api) -> list[dict[str, Any]]:
    """Run the queued jobs in a worker thread until no refining is left; the device's status meanwhile."""
    worker = Worker(api.factory, serving_registry(), poll_seconds=0.1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and any(
                job.status in (JobStatus.QUEUED, JobStatus.RUNNING) for job in _jobs(api, JobKind.REFINE)
            ):
                if worker.run_once() is None:
                    time.sleep(0.2)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    seen = []
    while thread.is_alive():
        seen.append(_status(api))
        time.sleep(0.2)
    thread.join()
    assert not errors, errors
    return seen


def _assert_every_run_after_stored_what_it_measured(api: Api, first_killed_row: int) -> None:
    """The profile runs after the killed one stored every measurement they took: none was refused as
    a sample key stored already."""
    with api.factory() as session:
        killed_run = session.scalar(
            select(NetworkMeasurement.run_id).where(NetworkMeasurement.id == first_killed_row)
        )
        later = session.scalars(select(ProfileRun).where(ProfileRun.id > (killed_run or 0))).all()
        assert later
        for run in later:
            assert run.summary is not None
            stored = session.scalar(
                select(func.count())
                .select_from(NetworkMeasurement)
                .where(NetworkMeasurement.run_id == run.id)
            )
            taken = sum(int(kind["ok"]) + int(kind["failed"]) for kind in run.summary["per_kind"].values())
            assert stored == taken


@pytest.mark.slow
def test_refining_resumes_after_a_kill_gives_way_to_other_jobs_and_stores_newer_versions(
    ready_device: Api,
    tiny_profile: TinyProfile,
    sqlite_migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = ready_device
    settings = first_run_settings(sqlite_migrated_url)
    job_id = start_first_run(settings, api.factory)
    assert job_id is not None
    status = _status(api)
    assert status["phase"] == "refining" and status["job_id"] == job_id and status["percent"] == 0
    assert status["predictor_version"] == 1 and status["refined"] is False and status["eta_seconds"] > 0
    listed = _device_list(monkeypatch, capsys, sqlite_migrated_url).split()
    assert listed[-6:-2] == ["1", "refining", "0%", "eta"]  # predictor version, then status

    # 1. A server's worker starts round 1 and is killed once the round has measured a network.
    killed, pid = _kill_a_worker_mid_round(api, sqlite_migrated_url)
    [round_1] = _jobs(api, JobKind.REFINE)
    assert round_1.status == JobStatus.RUNNING and f":{pid}:" in (round_1.lease_owner or "")
    assert _versions(api) == [1] and _latency_version(api, tiny_profile) == 1  # still ready

    # 2. The next start resumes the same job. A job queued after it goes first: the round gives way
    # (a fit of a device that is gone, which fails at once).
    assert start_first_run(settings, api.factory) == job_id
    assert "resuming" in _status(api)["message"]
    with api.factory() as session:
        enqueue(session, JobKind.FIT, {"device_id": api.device_id + 1})
        session.commit()

    # 3. The next server's worker runs everything; meanwhile the device's status is read.
    seen = _run_the_jobs_reading_the_status(api)

    [other] = _jobs(api, JobKind.FIT)
    round_1, round_2 = _jobs(api, JobKind.REFINE)
    assert other.status == JobStatus.FAILED and round_1.status == round_2.status == JobStatus.SUCCEEDED
    assert other.finished_at is not None and round_1.finished_at is not None
    assert other.finished_at < round_1.finished_at
    assert round_1.id == job_id and round_1.input["round"] == 1 and round_2.input["round"] == 2
    assert round_1.result is not None and round_2.result is not None
    # Each round sampled where the newest predictor was least sure, and stored the next version.
    assert (round_1.result["sampled_by_version"], round_1.result["version"]) == (1, 2)
    assert (round_2.result["sampled_by_version"], round_2.result["version"]) == (2, 3)
    assert _versions(api) == [1, 2, 3]

    refining = [status for status in seen if status["phase"] == "refining"]
    assert refining and all(s["refined"] is False and 0 <= s["percent"] < 100 for s in refining)
    assert {2} <= {s["predictor_version"] for s in refining}  # round 2, while version 2 answers
    assert any("paused while other jobs run" in (s["message"] or "") for s in refining)
    done = _status(api)
    assert done["phase"] == "ready" and done["refined"] is True and done["predictor_version"] == 3
    assert _latency_version(api, tiny_profile) == 3
    assert _device_list(monkeypatch, capsys, sqlite_migrated_url).split()[-3:] == ["3", "ready", "refined"]

    # Nothing was lost or measured twice: the killed run's rows stay, and every later run stored each
    # measurement it took.
    assert killed.items() <= _network_rows(api).items()
    _assert_every_run_after_stored_what_it_measured(api, min(killed))


def test_refining_turned_off_stops_a_queued_round_and_keeps_the_version(
    ready_device: Api, sqlite_migrated_url: str
) -> None:
    api = ready_device
    job_id = start_first_run(first_run_settings(sqlite_migrated_url), api.factory)
    assert job_id is not None and _status(api)["phase"] == "refining"

    off = first_run_settings(sqlite_migrated_url, refine_minutes=0)
    assert start_first_run(off, api.factory) is None
    [job] = _jobs(api, JobKind.REFINE)
    assert job.id == job_id and job.status == JobStatus.FAILED and "REFINE_MINUTES=0" in (job.error or "")
    status = _status(api)
    assert status["phase"] == "ready" and status["predictor_version"] == 1 and status["refined"] is None
    assert start_first_run(off, api.factory) is None
    assert len(_jobs(api, JobKind.REFINE)) == 1 and _versions(api) == [1]


def test_the_refining_scorer_is_the_members_disagreement_and_highest_far_from_the_profile(
    tiny_profile: TinyProfile,
) -> None:
    predictor = load_predictor(tiny_profile.fitted.artifact)
    spreads = []
    for network in (tiny_profile.network, *(generate_network(seed) for seed in range(8))):
        tn = tensorize(network, with_groups=False)
        with torch.no_grad():
            totals = predictor.model.member_network_ms(tn.layer_features(torch.zeros(1, 0)), tn.ops)
        spread = predictor.log_spread(network)
        assert spread == pytest.approx(float(member_log_spread(totals)[0]), rel=1e-6)
        spreads.append(spread)
    # The profile is width variants of one small network: generated networks are where it is less
    # sure. Judged on the median of eight, since one generated network can resemble the profile (the
    # spreads of single ones ranged 0.009-0.15 over a few profiles, the profiled network's 0.003-0.03).
    assert statistics.median(spreads[1:]) > spreads[0] >= 1e-3
