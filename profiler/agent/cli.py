"""The agent's command line: ``python -m profiler.agent`` and ``lpnet agent`` take the same flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from profiler.agent.client import AgentError
from profiler.agent.config import (
    API_KEY_ENV,
    DEFAULT_STATE_DIR,
    DEVICE_ENV,
    SERVER_ENV,
    STATE_DIR_ENV,
    AgentLoopConfig,
)
from profiler.errors import ProfilerError

DESCRIPTION = (
    "The device agent: say hello to an lpnet server, lease measurement tasks, run them, post the results."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags, for `python -m profiler.agent` and `lpnet agent` alike."""
    parser.add_argument("--server", help=f"the lpnet server's base URL (default: ${SERVER_ENV})")
    parser.add_argument(
        "--token", help=f"the device's agent key, or an admin key with --device (default: ${API_KEY_ENV})"
    )
    parser.add_argument(
        "--device", help=f"device name; with an admin key it is registered if new (default: ${DEVICE_ENV})"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help=f"agent id, keys, spool and outbox (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=5.0, help="wait between polls when idle (default: 5)"
    )
    parser.add_argument("--once", action="store_true", help="run the queued tasks, then exit")
    parser.add_argument(
        "--backend", default="torch-cpu", help="backend of a device registered here (default: torch-cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads of a device registered here (default: 1)"
    )
    parser.add_argument(
        "--profile-minutes",
        type=float,
        help="on start, queue a campaign of this many minutes (and a fit) if the device has no predictor yet",
    )
    parser.add_argument("--lease-seconds", type=float, help="task lease to ask for (default: the server's)")
    parser.add_argument(
        "--batch-rows", type=int, default=10, help="measurements per posted batch (default: 10)"
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentLoopConfig:
    """The configuration from parsed flags, falling back to the LPNET_* environment variables."""
    env = os.environ if environ is None else environ
    server = args.server or env.get(SERVER_ENV)
    token = args.token or env.get(API_KEY_ENV)
    if not server:
        raise AgentError(f"give the server: --server URL or ${SERVER_ENV}")
    if not token:
        raise AgentError(f"give an API key: --token KEY or ${API_KEY_ENV}")
    state_dir = args.state_dir or env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return AgentLoopConfig(
        server=server,
        token=token,
        device=args.device or env.get(DEVICE_ENV) or None,
        state_dir=Path(state_dir),
        poll_seconds=args.poll_seconds,
        once=args.once,
        backend=args.backend,
        threads=args.threads,
        profile_minutes=args.profile_minutes,
        lease_seconds=args.lease_seconds,
        batch_rows=args.batch_rows,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m profiler.agent", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from profiler.agent.loop import AgentLoop

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    try:
        return AgentLoop(config_from_args(args)).run()
    except ProfilerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
