"""`--server URL` and `--key KEY`: read commands that ask a remote lpnet server through `lpnet.client`
instead of the local database (`lpnet plan`, `lpnet predict`, `lpnet device list`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from service.commands._common import CommandError

if TYPE_CHECKING:
    from lpnet.client import Client

SERVER_ENV = "LPNET_SERVER"
KEY_ENV = "LPNET_API_KEY"


def server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--server`` and ``--key``, defaulting to ``$LPNET_SERVER`` and ``$LPNET_API_KEY``."""
    parser.add_argument(
        "--server", default=os.environ.get(SERVER_ENV), help=f"a remote lpnet server (${SERVER_ENV})"
    )
    parser.add_argument("--key", default=os.environ.get(KEY_ENV), help=f"the server's API key (${KEY_ENV})")


@contextmanager
def remote_client(args: argparse.Namespace) -> Iterator[Client]:
    """A client of ``args.server``; the server's errors and an unreachable server become one-line
    command errors.

    Raises:
        CommandError: No key, an error answer (its status, code and message), or no answer.
    """
    from lpnet.client import ApiError, Client, ClientError

    if not args.key:
        raise CommandError(f"--server needs an API key: --key or ${KEY_ENV}", 2)
    with Client(args.server, args.key) as client:
        try:
            yield client
        except ApiError as exc:
            raise CommandError(f"{exc.status} {exc.code}: {exc.message}") from exc
        except ClientError as exc:
            raise CommandError(str(exc)) from exc
