"""Keyset pagination of the list endpoints: opaque cursors and the one helper that pages a query.

A list is ordered by one column that is unique within it (an id, or a device's name), ascending or
descending. A page holds at most ``limit`` rows after the cursor's key; one more row is fetched to
know whether another page follows. Because the next page starts after the last key seen rather than
at an offset, rows added between requests are neither repeated nor skipped in a newest-first list:
they sort before the cursor and belong to a walk started later. In an ascending list they come at
the end and are reached by the walk.

The cursor is urlsafe base64 of a small JSON object: the list's name, the last key of the page, and
a digest of the list's filters. It is opaque to clients and not signed: a forged key only moves where
the page starts, since the filters (and who may see what) always come from the request. A cursor of
another list, or of the same list with other filters, is refused with 422 naming ``cursor``, and so
is anything that does not decode.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.errors import InvalidInput
from service.schemas.common import MAX_ID

DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 500
# Longest cursor accepted; the ones issued are well under 200 characters.
MAX_CURSOR_LENGTH = 512
# The longest string key a cursor may carry (device names are at most 128 characters).
MAX_STRING_KEY = 128

RowT = TypeVar("RowT")
ItemT = TypeVar("ItemT")
Key = int | str
FilterValue = str | int | None


class InvalidCursor(InvalidInput):
    """A cursor that this list did not issue: malformed, from another list, or from other filters.

    Answered like a request validation error of the ``cursor`` query parameter.
    """

    code = "validation_error"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"invalid request: query.cursor: {reason}",
            {"errors": [{"field": "query.cursor", "message": reason, "type": "value_error"}]},
        )


@dataclass(frozen=True)
class PageRequest:
    """Which page of a list to answer: at most `limit` rows after `cursor` (the first page without)."""

    limit: int = DEFAULT_PAGE_LIMIT
    cursor: str | None = None


@dataclass(frozen=True)
class Page(Generic[RowT]):
    """Rows of one page, and the cursor of the next page (None on the last)."""

    rows: list[RowT]
    next_cursor: str | None

    def map(self, describe: Callable[[list[RowT]], list[ItemT]]) -> Page[ItemT]:
        """The same page with its rows described all at once (e.g. as response models)."""
        return Page(describe(self.rows), self.next_cursor)


@dataclass(frozen=True)
class Keyset:
    """How a list is ordered: its name (which cursors carry) and one column, unique within the list."""

    name: str
    column: InstrumentedAttribute[Any]
    descending: bool = False


def _filters_digest(filters: Mapping[str, FilterValue]) -> str:
    canonical = json.dumps({k: v for k, v in filters.items() if v is not None}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_cursor(list_name: str, filters: Mapping[str, FilterValue], key: Key) -> str:
    """The cursor of the page after `key` in list `list_name` with `filters`."""
    payload = json.dumps({"l": list_name, "k": key, "f": _filters_digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _valid_key(key: object, key_type: type[Key]) -> bool:
    """Whether a cursor's key can be one of the list's: an id in range, or a printable name (the
    database cannot compare NUL characters or lone surrogates with its text)."""
    if key_type is int:
        return type(key) is int and 1 <= key <= MAX_ID
    return isinstance(key, str) and 0 < len(key) <= MAX_STRING_KEY and key.isprintable()


def decode_cursor(
    cursor: str, list_name: str, filters: Mapping[str, FilterValue], key_type: type[Key] = int
) -> Key:
    """The last key of the previous page, from a cursor this list issued with the same filters.

    Raises:
        InvalidCursor: The cursor does not decode, belongs to another list, or was issued for other
            filters.
    """
    malformed = "not a cursor this server issued; pass next_cursor from a previous page as it is"
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidCursor(malformed)
    try:
        payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidCursor(malformed) from None
    if not isinstance(payload, dict) or set(payload) != {"l", "k", "f"}:
        raise InvalidCursor(malformed)
    if payload["l"] != list_name:
        raise InvalidCursor("the cursor belongs to another list; pass the next_cursor this list answered")
    if payload["f"] != _filters_digest(filters):
        raise InvalidCursor(
            "the cursor was issued for other filters; repeat the first page's filters with it, "
            "or start again without a cursor"
        )
    key = payload["k"]
    if not _valid_key(key, key_type):
        raise InvalidCursor(malformed)
    assert isinstance(key, int | str)
    return key


def paginate(
    session: Session,
    query: Select[RowT],
    keyset: Keyset,
    page: PageRequest,
    filters: Mapping[str, FilterValue] | None = None,
) -> Page[RowT]:
    """One page of `query` (filtered, not yet ordered) in the keyset's order.

    Args:
        filters: The list's filters as the client gave them; cursors are bound to them.

    Raises:
        InvalidCursor: See `decode_cursor`.
    """
    filters = filters or {}
    column = keyset.column
    key_type: type[Key] = column.type.python_type
    if page.cursor is not None:
        after = decode_cursor(page.cursor, keyset.name, filters, key_type)
        query = query.where(column < after if keyset.descending else column > after)
    order = column.desc() if keyset.descending else column.asc()
    rows = list(session.scalars(query.order_by(order).limit(page.limit + 1)))
    if len(rows) <= page.limit:
        return Page(rows, None)
    rows = rows[: page.limit]
    return Page(rows, encode_cursor(keyset.name, filters, getattr(rows[-1], column.key)))
