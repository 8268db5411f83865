"""`lpnet agent`: the device agent loop of `profiler.agent_loop`, run on the device being measured."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import Settings

if TYPE_CHECKING:
    from service.commands._common import SubParsers

# The flags of `profiler.agent_loop.add_arguments`, declared here too: importing the profiler package
# pulls in torch, which `lpnet --help` and the other commands need not wait for.
SERVER_ENV = "LPNET_SERVER"
API_KEY_ENV = "LPNET_API_KEY"
DEVICE_ENV = "LPNET_AGENT_DEVICE"
STATE_DIR_ENV = "LPNET_AGENT_STATE_DIR"


def register(subparsers: SubParsers) -> None:
    """Add the ``agent`` command."""
    parser = subparsers.add_parser(
        "agent",
        help="run the agent of a remote device",
        description=(
            "Run on the device to measure: say hello to the server, then lease and run its tasks (profile "
            "campaigns, plan verifications) until stopped, posting every result with idempotency keys and "
            "spooling it on disk while the server is unreachable. With the device's agent key the device "
            "is the key's; with an admin key and --device NAME the device is registered from this machine "
            "if it is new, and an agent key for it is kept in the state directory."
        ),
    )
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
        help=f"agent id, keys, spool and outbox (default: ${STATE_DIR_ENV} or .lpnet-agent)",
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
    parser.set_defaults(handler=run_agent_command)


def run_agent_command(args: argparse.Namespace, _settings: Settings) -> int:
    """Run the agent loop until SIGTERM/SIGINT (or, with --once, until no task is left)."""
    import logging

    from profiler.agent_loop import AgentLoop, config_from_args

    # One line per heartbeat and poll would drown the agent's own progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return AgentLoop(config_from_args(args)).run()
