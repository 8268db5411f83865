"""`lpnet profile`: measure a device with the profiler, into the database or to a server.

Every measurement is committed (or, with --submit, journaled and posted) as soon as it finishes, so
Ctrl-C loses at most the one in flight, and rerunning the same command skips what is stored. The
process measures under the device's allocator policy: a local device's own, or `--allocator` with
--submit (the server refuses batches measured under another policy than its device's).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from profiler.agent.flags import add_device_arguments, add_sampling_arguments
from profiler.environment import AllocatorPolicy, apply_allocator_policy
from service.commands._common import CommandError, database_session, display_url, info
from service.config import Settings

if TYPE_CHECKING:
    from profiler.agent.options import AgentOptions
    from profiler.runner import RunSummary
    from service.commands._common import SubParsers

API_KEY_ENV = "LPNET_API_KEY"


def register(subparsers: SubParsers) -> None:
    """Add the ``profile`` command."""
    parser = subparsers.add_parser(
        "profile",
        help="measure a device (resumable)",
        description=(
            "Measure networks and layers on this machine for a registered local device and store each "
            "measurement in the database as it finishes; rerun the same command to resume. With --submit, "
            "post the measurements to a server instead (the device is then the server's)."
        ),
    )
    parser.add_argument("--device", required=True, help="device name (or id on the server with --submit)")
    add_sampling_arguments(parser)
    remote = parser.add_argument_group("posting to a server instead of the local database")
    remote.add_argument("--submit", metavar="URL", help="base URL of an lpnet server")
    remote.add_argument("--token", help=f"the device's agent key (default: ${API_KEY_ENV})")
    remote.add_argument("--spool-dir", type=Path, help="undelivered batches (default: in LPNET_DATA_DIR)")
    add_device_arguments(
        remote,
        "the server device's allocator policy, measured under (default: retain); a local device is "
        "measured under its own",
    )
    parser.set_defaults(handler=run_profile_command)


def _options(args: argparse.Namespace) -> AgentOptions:
    """The run's options from the flags (`profiler.agent.options.options_from_args`)."""
    from profiler.agent.options import options_from_args

    try:
        return options_from_args(args)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None


def run_profile_command(args: argparse.Namespace, settings: Settings) -> int:
    """Profile into the database, or to a server with --submit."""
    if args.submit:
        return _profile_to_server(args, settings)
    if args.token:
        raise CommandError("--token is only used with --submit URL", 2)
    if args.allocator:
        raise CommandError("--allocator is only used with --submit URL; a local device has its own", 2)
    return _profile_to_database(args, settings)


def _profile_to_database(args: argparse.Namespace, settings: Settings) -> int:
    from profiler.agent.options import build_sampler
    from profiler.runner import make_run_context, run_profile
    from service.db.models import RunStatus
    from service.db.session import make_engine, make_session_factory
    from service.devices import get_device
    from service.profiling import DatabaseSink, ProgressReporter

    with database_session(settings) as session:
        device = get_device(session, args.device)
        if not device.is_local:
            raise CommandError(
                f"device {device.name!r} is remote: measure it on its own machine with "
                f"`lpnet profile --device {device.name} --submit URL` or `python -m profiler.agent.standalone`"
            )
        session.expunge(device)
    if args.hardware and args.hardware != device.hardware:
        raise CommandError(f"--hardware differs from device {device.name!r}'s ({device.hardware!r})", 2)
    # The registered spec, exactly: sample keys follow it.
    options = dataclasses.replace(
        _options(args),
        backend=device.backend,
        threads=device.threads,
        batch_size=device.batch_size,
        dtype=device.dtype,
        hardware=device.hardware,
        allocator=AllocatorPolicy(device.allocator),
    )
    apply_allocator_policy(options.allocator)
    spec = options.device()
    backend = spec.create_backend()
    sampler = build_sampler(options, spec)
    protocol = options.protocol()
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    try:
        sink = DatabaseSink(factory, device, make_run_context(spec, protocol, backend))
        reporter = ProgressReporter(factory, device.id, options.budget_minutes, sampler.planned_total())
        info(
            f"profiling {device.name!r} into {display_url(settings.database_url)} (run {sink.run_id}); "
            "Ctrl-C stops, rerunning resumes"
        )
        reporter.start()
        summary: RunSummary | None = None
        try:
            summary = run_profile(
                spec,
                sampler,
                sink,
                protocol,
                budget_minutes=options.budget_minutes,
                progress=options.progress,
                backend=backend,
                on_measurement=reporter,
                seconds_per_process=options.seconds_per_process,
            )
        finally:
            interrupted = summary is None or summary.interrupted
            sink.close(
                RunStatus.INTERRUPTED if interrupted else RunStatus.COMPLETED,
                summary.to_dict() if summary is not None else None,
            )
            reporter.finish()
    finally:
        engine.dispose()
    assert summary is not None  # run_profile returned, or the exception above propagated
    summary.print_table()
    return 130 if summary.interrupted else 0


def _profile_to_server(args: argparse.Namespace, settings: Settings) -> int:
    from profiler.agent.options import build_sampler
    from profiler.runner import make_run_context, run_profile
    from profiler.sinks import HttpSink

    token = args.token or os.environ.get(API_KEY_ENV)
    if not token:
        raise CommandError(f"--submit needs the device's agent key: --token KEY or ${API_KEY_ENV}", 2)
    options = _options(args)
    # Before anything is fingerprinted: the batches' environment states the policy they ran under.
    apply_allocator_policy(options.allocator)
    spec = options.device()
    backend = spec.create_backend()
    protocol = options.protocol()
    spool = args.spool_dir or settings.data_dir / "spool" / _safe(args.submit) / _safe(args.device)
    sink = HttpSink(args.submit, args.device, token, make_run_context(spec, protocol, backend), spool)
    info(f"profiling for device {args.device!r} on {args.submit}; undelivered batches wait in {spool}")
    try:
        summary = run_profile(
            spec,
            build_sampler(options, spec),
            sink,
            protocol,
            budget_minutes=options.budget_minutes,
            progress=options.progress,
            backend=backend,
            seconds_per_process=options.seconds_per_process,
        )
    finally:
        sink.close()
    summary.print_table()
    return 130 if summary.interrupted else 0


def _safe(text: str) -> str:
    """A string fit to be a directory name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:100] or "_"
