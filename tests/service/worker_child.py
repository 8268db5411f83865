"""A worker process for the job tests: ``python -m tests.service.worker_child URL OWNER LEASE_SECONDS``.

It runs test tasks only: ``test.sleep`` sleeps ``input["seconds"]`` on its first attempt (long
enough to be killed in the middle) and returns at once on later ones; ``test.record`` appends
"<job id> <owner> start|end" lines to ``input["log"]`` around a short sleep.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from service.db.session import make_engine, make_session_factory
from service.jobs.context import JobContext
from service.jobs.queue import ClaimedJob, TaskOutcome
from service.jobs.registry import Task, TaskRegistry
from service.jobs.worker import Worker


def sleep_task(job: ClaimedJob, context: JobContext) -> TaskOutcome:
    if job.attempt == 1:
        deadline = time.monotonic() + float(job.input["seconds"])
        while time.monotonic() < deadline:
            context.progress("sleeping", force=True)
            time.sleep(0.05)
    return TaskOutcome({"owner": job.owner, "attempt": job.attempt})


def record_task(job: ClaimedJob, _context: JobContext) -> TaskOutcome:
    log = Path(job.input["log"])
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"{job.id} {job.owner} start\n")
    time.sleep(float(job.input.get("seconds", 0.02)))
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"{job.id} {job.owner} end\n")
    return TaskOutcome({"owner": job.owner})


def child_registry() -> TaskRegistry:
    return TaskRegistry([Task("test.sleep", sleep_task), Task("test.record", record_task)])


def main() -> None:
    url, owner, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    engine = make_engine(url)
    worker = Worker(
        make_session_factory(engine), child_registry(), owner=owner, lease_seconds=lease, poll_seconds=0.05
    )
    worker.run_forever(threading.Event())


if __name__ == "__main__":
    main()
