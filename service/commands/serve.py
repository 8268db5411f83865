"""`lpnet serve`: run the HTTP API with uvicorn."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from service.commands._common import display_url, info
from service.config import Settings

if TYPE_CHECKING:
    from service.commands._common import SubParsers


def port_number(text: str) -> int:
    """argparse type for a TCP port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def register(subparsers: SubParsers) -> None:
    """Add the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP API",
        description=(
            "Run the HTTP API, and background jobs (fits, plans) in worker threads unless "
            "LPNET_WORKER__EMBEDDED=false. An SQLite database is migrated to the newest schema first; a "
            "PostgreSQL database must already be migrated with `lpnet db upgrade`. On a database without "
            "an admin key, one is created and printed once; on a machine without a local device, this CPU "
            "is registered, profiled and fitted in the background (LPNET_FIRST_RUN__ENABLED=false turns "
            "both off)."
        ),
    )
    parser.add_argument("--host", help="interface to listen on (default: LPNET_HOST or 127.0.0.1)")
    parser.add_argument(
        "--port", type=port_number, help="TCP port to listen on (default: LPNET_PORT or 8000)"
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Prepare the database schema and serve the API until interrupted."""
    # Imported here so that `lpnet --help` and the other commands do not pay for uvicorn and FastAPI.
    import uvicorn

    from service.db.migrate import ensure_schema
    from service.main import create_app

    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    settings = settings.model_copy(update=overrides)

    upgraded_from = ensure_schema(settings.database_url)
    if upgraded_from is not None:
        info(f"migrated {display_url(settings.database_url)} from {upgraded_from} to the newest schema")
    info(f"serving on http://{settings.host}:{settings.port} (API docs at /docs)")
    if settings.worker.embedded:
        info(f"running background jobs in this process ({settings.worker.threads} worker thread(s))")
    else:
        info("not running background jobs here (LPNET_WORKER__EMBEDDED=false): start `lpnet worker`")
    check_admin_keys_at_start(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # Our own logging set-up (with request ids) stays in place.
        log_config=None,
        log_level=settings.log_level.lower(),
    )
    return 0


def check_admin_keys_at_start(settings: Settings) -> None:
    """Make LPNET_ADMIN_KEY an admin key, or create and print a first one on a database without any.

    The created key goes to stdout once, framed, with curl lines to try; notes go to stderr.

    Raises:
        service.errors.Conflict: LPNET_ADMIN_KEY is stored with another scope.
    """
    from service.db.session import make_engine, make_session_factory, session_scope
    from service.first_run.keys import check_admin_keys, print_admin_key_report

    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            check = check_admin_keys(session, settings)
    finally:
        engine.dispose()
    print_admin_key_report(check, settings, out=sys.stdout, notes=sys.stderr)
