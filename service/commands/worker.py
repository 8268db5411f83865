"""`lpnet worker`: run background jobs (fits, plans) from the database."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from service.commands._common import display_url, info
from service.config import Settings

if TYPE_CHECKING:
    from service.commands._common import SubParsers


def register(subparsers: SubParsers) -> None:
    """Add the ``worker`` command."""
    parser = subparsers.add_parser(
        "worker",
        help="run background jobs",
        description=(
            "Claim and run jobs (fits, plans) from the database until stopped. Several workers on several "
            "machines may share one PostgreSQL database: each job runs on one of them at a time, and a "
            "job whose worker died is taken over once its lease lapses. Run `lpnet serve` with "
            "LPNET_WORKER__EMBEDDED=false when separate workers do the work."
        ),
    )
    parser.add_argument(
        "--threads", type=int, help="jobs run at once (default: LPNET_WORKER__THREADS, i.e. 1)"
    )
    parser.add_argument("--once", action="store_true", help="run the jobs queued now, then exit")
    parser.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run workers until SIGINT/SIGTERM (or, with --once, until the queue is empty)."""
    import torch

    from service.db.migrate import ensure_schema
    from service.db.session import make_engine, make_session_factory
    from service.job_handlers import default_registry
    from service.jobs.worker import Worker, WorkerPool

    ensure_schema(settings.database_url)
    torch.set_num_threads(settings.torch_threads)
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    worker_settings = settings.worker
    try:
        if args.once:
            worker = Worker(
                factory,
                default_registry(),
                lease_seconds=worker_settings.lease_seconds,
                poll_seconds=worker_settings.poll_seconds,
            )
            count = 0
            while worker.run_once() is not None:
                count += 1
            print(f"ran {count} job(s)")
            return 0
        pool = WorkerPool(
            factory,
            default_registry(),
            threads=args.threads or worker_settings.threads,
            lease_seconds=worker_settings.lease_seconds,
            poll_seconds=worker_settings.poll_seconds,
        )
        stop = threading.Event()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            info(f"received {signal.Signals(signum).name}; finishing the running job(s)")
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        info(f"worker(s) on {display_url(settings.database_url)}; Ctrl-C stops")
        pool.start()
        while not stop.wait(1.0):
            pass
        # A job still running after the grace period is left to its lease and retried elsewhere.
        pool.stop(timeout=worker_settings.lease_seconds)
    finally:
        engine.dispose()
    return 0
