"""The job queue and workers on SQLite and PostgreSQL: leases, retries, failures, exclusive runs,
deadlines, deferred jobs, and how a crash is reported."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.migrate import upgrade
from service.db.models import Job, JobStatus, ModelUpload
from service.db.session import make_engine, make_session_factory
from service.jobs.context import JobContext
from service.jobs.queue import (
    ClaimedJob,
    Deferred,
    TaskOutcome,
    claim_job,
    complete_job,
    enqueue,
    fail_job,
    renew_lease,
    wake_job,
)
from service.jobs.registry import Task, TaskRegistry, UnknownJobKind
from service.jobs.worker import Worker
from tests.service.worker_child import child_registry

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def factory(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_url)
    yield make_session_factory(engine)
    engine.dispose()


def add_job(
    factory: sessionmaker[Session],
    kind: str = "test.record",
    max_attempts: int = 3,
    timeout_seconds: float | None = None,
    **job_input: object,
) -> int:
    with factory() as session:
        job = enqueue(
            session, kind, dict(job_input), max_attempts=max_attempts, timeout_seconds=timeout_seconds
        )
        session.commit()
        return job.id


def read_job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def expire_lease(factory: sessionmaker[Session], job_id: int) -> None:
    with factory() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def test_claim_complete_and_nothing_left(factory: sessionmaker[Session]) -> None:
    assert claim_job(factory, "w1", 30) is None
    first, second = add_job(factory), add_job(factory)
    job = claim_job(factory, "w1", 30)
    assert job is not None and job.id == first and job.attempt == 1 and job.owner == "w1"
    stored = read_job(factory, first)
    assert stored.status == JobStatus.RUNNING and stored.lease_owner == "w1"
    assert stored.lease_expires_at is not None and stored.lease_expires_at > utcnow()
    # A held lease is not claimable; the next job is.
    other = claim_job(factory, "w2", 30)
    assert other is not None and other.id == second
    assert claim_job(factory, "w3", 30) is None
    assert complete_job(factory, job, TaskOutcome({"answer": 42}))
    done = read_job(factory, first)
    assert done.status == JobStatus.SUCCEEDED and done.result == {"answer": 42}
    assert done.finished_at is not None and done.lease_expires_at is None


def test_claims_filter_by_kind(factory: sessionmaker[Session]) -> None:
    add_job(factory, kind="fit")
    assert claim_job(factory, "w", 30, kinds=["plan"]) is None
    assert claim_job(factory, "w", 30, kinds=["fit", "plan"]) is not None


def test_a_lapsed_lease_is_reclaimed_and_the_old_owner_is_shut_out(factory: sessionmaker[Session]) -> None:
    job_id = add_job(factory)
    first = claim_job(factory, "w1", 30)
    assert first is not None
    assert claim_job(factory, "w2", 30) is None
    expire_lease(factory, job_id)
    second = claim_job(factory, "w2", 30)
    assert second is not None and second.id == job_id and second.attempt == 2
    # The first worker lost the job: it can neither renew, finish nor fail it.
    assert not renew_lease(factory, job_id, "w1", 30)
    assert not complete_job(factory, first, TaskOutcome({"from": "w1"}))
    assert fail_job(factory, first, "late", retry=True) is None
    assert renew_lease(factory, job_id, "w2", 30)
    assert complete_job(factory, second, TaskOutcome({"from": "w2"}))
    assert read_job(factory, job_id).result == {"from": "w2"}


def test_attempts_are_bounded_then_the_job_fails_with_the_reason(factory: sessionmaker[Session]) -> None:
    job_id = add_job(factory, max_attempts=2)
    for owner in ("w1", "w2"):
        assert claim_job(factory, owner, 30) is not None
        expire_lease(factory, job_id)
    assert claim_job(factory, "w3", 30) is None
    job = read_job(factory, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 2
    assert job.error is not None and "stopped renewing its lease" in job.error and "w2" in job.error


def test_failed_attempts_are_retried_until_none_are_left(factory: sessionmaker[Session]) -> None:
    job_id = add_job(factory, max_attempts=2)
    job = claim_job(factory, "w", 30)
    assert job is not None and fail_job(factory, job, "RuntimeError: flaky", retry=True) == JobStatus.QUEUED
    assert read_job(factory, job_id).error == "RuntimeError: flaky"
    job = claim_job(factory, "w", 30)
    assert job is not None and job.attempt == 2
    assert fail_job(factory, job, "RuntimeError: flaky", retry=True) == JobStatus.FAILED
    assert read_job(factory, job_id).status == JobStatus.FAILED


def test_a_result_lands_with_its_rows_or_not_at_all(factory: sessionmaker[Session]) -> None:
    job_id = add_job(factory)
    job = claim_job(factory, "w", 30)
    assert job is not None

    def store_then_fail(session: Session) -> dict[str, object]:
        session.add(ModelUpload(name="half", weights=b"x", sha256="0" * 64, size_bytes=1))
        session.flush()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        complete_job(factory, job, TaskOutcome({"partial": True}, store=store_then_fail))
    stored = read_job(factory, job_id)
    assert stored.status == JobStatus.RUNNING and stored.result is None
    with factory() as session:
        assert session.query(ModelUpload).count() == 0

    def store(session: Session) -> dict[str, object]:
        upload = ModelUpload(name="whole", weights=b"x", sha256="0" * 64, size_bytes=1)
        session.add(upload)
        session.flush()
        return {"model_id": upload.id}

    assert complete_job(factory, job, TaskOutcome({"done": True}, store=store))
    result = read_job(factory, job_id).result
    assert result is not None and result["done"] is True and result["model_id"] >= 1


def test_workers_map_errors_to_retry_or_failure(factory: sessionmaker[Session]) -> None:
    from lpnet.errors import InvalidArchitecture

    calls: Counter[str] = Counter()

    def flaky(job: object, context: JobContext) -> TaskOutcome:
        calls["flaky"] += 1
        context.progress("working", 50.0, force=True)
        if calls["flaky"] == 1:
            raise RuntimeError("transient")
        return TaskOutcome({"ok": True})

    def invalid(job: object, context: JobContext) -> TaskOutcome:
        raise InvalidArchitecture("layer 'x' is broken")

    failures: list[str] = []
    registry = TaskRegistry(
        [
            Task("flaky", flaky),
            Task("invalid", invalid, on_failure=lambda _f, _job, error: failures.append(error)),
        ]
    )
    worker = Worker(factory, registry, lease_seconds=30)
    flaky_id = add_job(factory, kind="flaky")
    invalid_id = add_job(factory, kind="invalid")
    while worker.run_once() is not None:
        pass
    flaky_job = read_job(factory, flaky_id)
    assert flaky_job.status == JobStatus.SUCCEEDED and flaky_job.attempts == 2
    assert flaky_job.progress == {"phase": "working", "percent": 50.0}
    invalid_job = read_job(factory, invalid_id)
    assert invalid_job.status == JobStatus.FAILED and invalid_job.attempts == 1  # no retry for domain errors
    assert invalid_job.error == "layer 'x' is broken" and failures == ["layer 'x' is broken"]
    with pytest.raises(UnknownJobKind):
        registry.get("nope")


def test_the_lease_is_renewed_while_a_job_runs(factory: sessionmaker[Session], tmp_path: Path) -> None:
    job_id = add_job(factory, kind="test.record", log=str(tmp_path / "log.txt"), seconds=1.2)
    worker = Worker(factory, child_registry(), owner="keeper", lease_seconds=0.6)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    time.sleep(0.8)  # past the first lease: still held, so renewed
    assert claim_job(factory, "thief", 0.6) is None
    thread.join()
    job = read_job(factory, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and job.result == {"owner": "keeper"}


def test_two_workers_never_run_the_same_job(migrated_url: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.txt"
    engines = [make_engine(migrated_url) for _ in range(2)]
    factories = [make_session_factory(engine) for engine in engines]
    job_ids = {add_job(factories[0], log=str(log), seconds=0.01) for _ in range(24)}
    workers = [Worker(f, child_registry(), owner=f"w{i}", lease_seconds=30) for i, f in enumerate(factories)]

    def drain(worker: Worker) -> None:
        while worker.run_once() is not None:
            pass

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = log.read_text().split()
    starts = Counter(int(lines[i]) for i in range(0, len(lines), 3) if lines[i + 2] == "start")
    assert set(starts) == job_ids and set(starts.values()) == {1}
    ends = Counter(int(lines[i]) for i in range(0, len(lines), 3) if lines[i + 2] == "end")
    assert ends == starts
    assert {lines[i + 1] for i in range(0, len(lines), 3)} <= {"w0", "w1"}
    with factories[0]() as session:
        assert {job.status for job in session.query(Job)} == {JobStatus.SUCCEEDED}
    for engine in engines:
        engine.dispose()


def _spawn_child(url: str, owner: str, lease: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.service.worker_child", url, owner, str(lease)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_a_killed_workers_job_is_retried_after_its_lease_lapses(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    job_id = add_job(factory, kind="test.sleep", seconds=60)
    child = _spawn_child(migrated_url, "doomed", lease=1.5)
    try:
        deadline = time.monotonic() + 60
        while read_job(factory, job_id).lease_owner != "doomed":
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the child worker never claimed the job"
            time.sleep(0.1)
        time.sleep(1.0)  # the child renews its lease meanwhile
        assert read_job(factory, job_id).status == JobStatus.RUNNING
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    survivor = Worker(factory, child_registry(), owner="survivor", lease_seconds=30)
    assert survivor.run_once() is None, "the dead worker's lease has not lapsed yet"
    deadline = time.monotonic() + 10
    while (claimed := survivor.run_once()) is None:
        assert time.monotonic() < deadline, "the job was never reclaimed"
        time.sleep(0.2)
    assert claimed.id == job_id
    job = read_job(factory, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2
    assert job.result == {"owner": "survivor", "attempt": 2}
    engine.dispose()


@pytest.mark.postgres
def test_skip_locked_claims_do_not_block_each_other(postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    first, second = add_job(factory), add_job(factory)
    # A transaction holding the first job's row lock (as a claim in progress would) ...
    with factory() as holder:
        holder.query(Job).filter(Job.id == first).with_for_update().one()
        # ... does not stop another worker from claiming the next job at once.
        started = time.monotonic()
        claimed = claim_job(factory, "w2", 30)
        assert claimed is not None and claimed.id == second
        assert time.monotonic() - started < 2
    engine.dispose()


def test_every_job_gets_a_deadline_from_its_kind(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.config import get_settings

    monkeypatch.setenv("LPNET_WORKER__PLAN_TIMEOUT_SECONDS", "600")
    monkeypatch.setenv("LPNET_WORKER__FIT_TIMEOUT_SECONDS", "1200")
    monkeypatch.setenv("LPNET_WORKER__FIRST_RUN_TIMEOUT_SECONDS", "900")
    get_settings.cache_clear()
    timeouts = {
        kind: read_job(factory, add_job(factory, kind=kind, **job_input))
        for kind, job_input in [
            ("plan", {}),
            ("fit", {}),
            ("bootstrap", {"budget_minutes": 6}),
            ("other", {}),
        ]
    }
    seconds = {
        kind: (job.deadline_at - job.created_at).total_seconds()
        for kind, job in timeouts.items()
        if job.deadline_at is not None
    }
    assert seconds == pytest.approx({"plan": 600, "fit": 1200, "bootstrap": 6 * 60 + 900, "other": 1200})


def stubborn(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    """Works in small steps, reporting progress, for `seconds`."""
    deadline = time.monotonic() + float(job.input.get("seconds", 30))
    while time.monotonic() < deadline:
        context.progress("working", force=True)
        time.sleep(0.05)
    return TaskOutcome({"done": True})


def test_a_running_job_past_its_deadline_is_stopped_and_not_retried(factory: sessionmaker[Session]) -> None:
    failures: list[str] = []
    registry = TaskRegistry(
        [Task("stubborn", stubborn, on_failure=lambda _f, _job, error: failures.append(error))]
    )
    job_id = add_job(factory, kind="stubborn", timeout_seconds=0.6, seconds=30)
    started = time.monotonic()
    assert Worker(factory, registry, lease_seconds=30).run_once() is not None
    assert time.monotonic() - started < 5, "the job ran on past its deadline"
    job = read_job(factory, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 1 and job.error == "timed out after 0.6 s"
    assert failures == ["timed out after 0.6 s"]
    assert Worker(factory, registry, lease_seconds=30).run_once() is None  # no retry


def test_a_queued_job_past_its_deadline_fails_when_the_queue_is_swept(factory: sessionmaker[Session]) -> None:
    failures: list[str] = []
    registry = TaskRegistry(
        [Task("stubborn", stubborn, on_failure=lambda _f, _job, error: failures.append(error))]
    )
    late = add_job(factory, kind="stubborn", timeout_seconds=0.2, seconds=0)
    time.sleep(0.3)
    assert claim_job(factory, "w", 30) is None  # past its deadline: never claimed
    in_time = add_job(factory, kind="stubborn", timeout_seconds=60, seconds=0)
    claimed = Worker(factory, registry, lease_seconds=30).run_once()
    assert claimed is not None and claimed.id == in_time
    job = read_job(factory, late)
    assert job.status == JobStatus.FAILED and job.attempts == 0 and job.finished_at is not None
    assert job.error == "timed out after 0.2 s before a worker started it" and failures == [job.error]
    assert read_job(factory, in_time).status == JobStatus.SUCCEEDED


def test_a_job_that_ignores_its_deadline_loses_its_lease_and_is_failed(
    factory: sessionmaker[Session],
) -> None:
    def deaf(job: ClaimedJob, _context: JobContext) -> TaskOutcome:
        time.sleep(float(job.input["seconds"]))  # never checks
        return TaskOutcome({"late": True})

    registry = TaskRegistry([Task("deaf", deaf)])
    job_id = add_job(factory, kind="deaf", timeout_seconds=0.3, seconds=2.0)
    thread = threading.Thread(
        target=Worker(factory, registry, owner="deaf-worker", lease_seconds=0.3).run_once
    )
    thread.start()
    deadline = time.monotonic() + 5
    while read_job(factory, job_id).lease_owner != "deaf-worker":
        assert time.monotonic() < deadline, "the worker never claimed the job"
        time.sleep(0.02)
    # Renewed until a lease length past the deadline, then left to lapse: another worker's sweep fails it.
    while read_job(factory, job_id).status != JobStatus.FAILED:
        assert time.monotonic() < deadline, "the job was never failed"
        Worker(factory, registry, owner="sweeper", lease_seconds=0.3).run_once()
        time.sleep(0.1)
    thread.join()
    job = read_job(factory, job_id)
    assert job.status == JobStatus.FAILED and job.result is None and job.attempts == 1
    assert job.error == "timed out after 0.3 s after its worker (deaf-worker) stopped renewing its lease"


def test_a_deferred_job_frees_its_worker_and_resumes_without_spending_an_attempt(
    factory: sessionmaker[Session],
) -> None:
    runs: list[ClaimedJob] = []

    def patient(job: ClaimedJob, context: JobContext) -> TaskOutcome:
        runs.append(job)
        if len(runs) == 1:
            context.progress("starting", force=True)
            raise Deferred(float(job.input["retry_after"]), "waiting_for_agent", "waiting for the agent")
        return TaskOutcome({"runs": len(runs)})

    registry = TaskRegistry([Task("patient", patient), Task("stubborn", stubborn)])
    worker = Worker(factory, registry, lease_seconds=30)
    waiting = add_job(factory, kind="patient", retry_after=0.5)
    other = add_job(factory, kind="stubborn", seconds=0)
    assert worker.run_once() is not None and len(runs) == 1 and not runs[0].resumed
    job = read_job(factory, waiting)
    assert job.status == JobStatus.RUNNING and job.lease_owner is None and job.lease_expires_at is None
    assert job.progress == {"phase": "waiting_for_agent", "message": "waiting for the agent"}
    assert job.attempts == 1 and job.not_before is not None and job.not_before > utcnow()
    # The worker is free at once for another job; the deferred one is not due yet.
    claimed = worker.run_once()
    assert (
        claimed is not None and claimed.id == other and read_job(factory, other).status == JobStatus.SUCCEEDED
    )
    assert worker.run_once() is None
    time.sleep(0.6)
    resumed = worker.run_once()
    assert resumed is not None and resumed.id == waiting and resumed.resumed and resumed.attempt == 1
    job = read_job(factory, waiting)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and job.result == {"runs": 2}


def test_a_deferred_job_is_woken_at_once_and_fails_when_swept_past_its_deadline(
    factory: sessionmaker[Session],
) -> None:
    def waiting(job: ClaimedJob, _context: JobContext) -> TaskOutcome:
        raise Deferred(3600, "waiting_for_agent", "waiting for the agent")

    registry = TaskRegistry([Task("waiting", waiting)])
    worker = Worker(factory, registry, lease_seconds=30)
    job_id = add_job(factory, kind="waiting", timeout_seconds=1.5)
    assert worker.run_once() is not None and worker.run_once() is None
    with factory() as session:
        assert wake_job(session, job_id)
        session.commit()
    assert worker.run_once() is not None  # due at once, deferred again for an hour
    assert read_job(factory, job_id).attempts == 1
    deadline_at = read_job(factory, job_id).deadline_at
    assert deadline_at is not None
    time.sleep(max(0.0, (deadline_at - utcnow()).total_seconds()) + 0.1)
    assert worker.run_once() is None
    job = read_job(factory, job_id)
    assert (
        job.status == JobStatus.FAILED
        and job.error == "timed out after 1.5 s while waiting (waiting_for_agent)"
    )
    with factory() as session:
        assert not wake_job(session, job_id)  # a finished job is not woken


def test_a_crash_stores_a_generic_message_and_logs_the_details_under_its_id(
    factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    def leaky(_job: ClaimedJob, _context: JobContext) -> TaskOutcome:
        raise RuntimeError("cannot open /srv/lpnet/secret.db as user lpnet")

    registry = TaskRegistry([Task("leaky", leaky)])
    job_id = add_job(factory, kind="leaky", max_attempts=1)
    with caplog.at_level(logging.ERROR, logger="service.jobs.worker"):
        Worker(factory, registry, lease_seconds=30).run_once()
    job = read_job(factory, job_id)
    assert job.status == JobStatus.FAILED and job.error is not None
    match = re.fullmatch(r"internal error \(id ([0-9a-f]{8})\); the server log has the details", job.error)
    assert match is not None, job.error
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "secret.db" in str(logged[0].exc_info[1]) and f"job {job_id} (leaky)" in logged[0].getMessage()
