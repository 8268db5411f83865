"""Pieces shared by the command modules: the handler signature, user errors, tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeAlias

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from lpnet.gates.options import OptionSpec
from profiler.agent.flags import non_negative_int, positive_float
from service.config import Settings
from service.db.migrate import ensure_schema
from service.db.session import make_engine, make_session_factory, session_scope

# What `parser.set_defaults(handler=...)` points at: runs the command, returns the exit code.
Handler = Callable[[argparse.Namespace, Settings], int]
if TYPE_CHECKING:
    # The object `ArgumentParser.add_subparsers()` returns; each command module adds its parsers to it.
    # Generic only in the type stubs, hence for annotations only.
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class CommandError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def describe_validation_error(what: str, exc: ValidationError) -> str:
    """One line listing what was wrong with the fields of `what`."""
    problems = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or what
        problems.append(f"{field}: {error['msg']}")
    return f"invalid {what}: " + "; ".join(problems)


def display_url(url: str) -> str:
    """The database URL with any password masked, fit to print."""
    return make_url(url).render_as_string(hide_password=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as left-aligned columns under a header line."""
    cells = [[("-" if value is None else str(value)) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for row in [list(headers), *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def info(message: str) -> None:
    """Print a note for people on stderr, keeping stdout for what scripts capture."""
    print(message, file=sys.stderr)


@contextmanager
def database_session(settings: Settings) -> Iterator[Session]:
    """A session on the configured database that commits when the block succeeds.

    The schema is prepared first: SQLite is migrated to head, PostgreSQL must be at head already.
    """
    upgraded_from = ensure_schema(settings.database_url)
    if upgraded_from is not None:
        info(f"migrated {display_url(settings.database_url)} from {upgraded_from} to the newest schema")
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


# argparse types ---------------------------------------------------------------------------------


def at_least_one(text: str) -> float:
    """argparse type for a factor of 1 or more."""
    value = positive_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def comma_list(text: str) -> list[str]:
    """argparse type for a comma-separated list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return items


def positive_int(text: str) -> int:
    """argparse type for a count of at least one."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def share(text: str) -> float:
    """argparse type for a share in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text}")
    return value


def option_argument(parser: argparse._ActionsContainer, spec: OptionSpec[Any]) -> None:
    """Add the flag of an lpnet option (`lpnet.gates.options`): ``--its-name``, its default, and its
    description as help.

    A value outside the option's bounds is refused as argparse refuses any bad value; an option that
    may be null also takes ``none``; an enum option takes its values as choices.
    """
    flag = "--" + spec.name.replace("_", "-")
    shown = "none" if spec.default is None else str(spec.default)
    nullable = "; none for null" if spec.nullable and spec.default is not None else ""
    help_text = f"{spec.description} (default: {shown}{nullable})".replace("%", "%%")
    kind = spec.value_type
    if issubclass(kind, Enum):
        parser.add_argument(flag, type=kind, choices=list(kind), default=spec.default, help=help_text)
    else:
        parser.add_argument(flag, type=option_value(spec, kind), default=spec.default, help=help_text)


def option_value(spec: OptionSpec[Any], kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type for a value of `spec`, read by `kind` (``int``, ``float``) and checked against
    the option's bounds."""

    def read(text: str) -> Any:
        if spec.nullable and text.lower() in ("none", "null"):
            return None
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        problem = spec.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    return read
