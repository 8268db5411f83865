"""The ``limit`` and ``cursor`` query parameters every list endpoint takes (`service.pagination`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from service.pagination import DEFAULT_PAGE_LIMIT, MAX_CURSOR_LENGTH, MAX_PAGE_LIMIT, PageRequest


async def page_request(
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_LIMIT, description=f"Items per page, 1 to {MAX_PAGE_LIMIT}.")
    ] = DEFAULT_PAGE_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CURSOR_LENGTH,
            description="The previous page's `next_cursor`, with the same filters; omit for the first page.",
        ),
    ] = None,
) -> PageRequest:
    """Which page a list request asks for (async: no thread pool hop for this little work)."""
    return PageRequest(limit=limit, cursor=cursor)


PageQuery = Annotated[PageRequest, Depends(page_request)]
