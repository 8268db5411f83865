"""`lpnet agent`: the device agent loop of `profiler.agent`, run on the device being measured."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from service.config import Settings

if TYPE_CHECKING:
    from service.commands._common import SubParsers


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
    from profiler.agent.cli import add_arguments  # httpx only: no torch at registration

    add_arguments(parser)
    parser.set_defaults(handler=run_agent_command)


def run_agent_command(args: argparse.Namespace, _settings: Settings) -> int:
    """Run the agent loop until SIGTERM/SIGINT (or, with --once, until no task is left)."""
    import logging

    from profiler.agent.cli import config_from_args
    from profiler.agent.loop import AgentLoop

    # One line per heartbeat and poll would drown the agent's own progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return AgentLoop(config_from_args(args)).run()
