"""The `lpnet` command line: parses arguments, reads settings, runs one command.

User errors (bad arguments, unknown names, an unreachable or outdated database) print one line to
stderr and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from lpnet.errors import LpnetError
from service.commands import COMMAND_GROUPS
from service.commands._common import CommandError, describe_validation_error
from service.config import get_settings, load_env_file
from service.db.session import describe_database_error
from service.errors import ServiceError
from service.log import configure_logging
from service.version import package_version

PROG = "lpnet"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered command group."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Latency prediction and latency-budgeted pruning for CNNs.",
        epilog="Settings come from LPNET_* environment variables, e.g. LPNET_DATABASE_URL, LPNET_DATA_DIR, "
        "and from a .env file in the working directory for those not set ($LPNET_ENV_FILE names another file).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMAND_GROUPS:
        register(subparsers)
    return parser


def _fail(message: str, exit_code: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lpnet` command line and return its exit code.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        load_env_file()
        settings = get_settings()
    except FileNotFoundError as exc:
        return _fail(str(exc), 2)
    except ValidationError as exc:
        return _fail(describe_validation_error("LPNET_* settings", exc), 2)
    configure_logging(settings.log_level)
    try:
        exit_code: int = args.handler(args, settings)
    except CommandError as exc:
        return _fail(exc.message, exc.exit_code)
    except (ServiceError, LpnetError) as exc:
        return _fail(exc.message)
    except SQLAlchemyError as exc:
        return _fail(f"database error: {describe_database_error(exc)}")
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
