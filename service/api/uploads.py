"""Reading multipart uploads with a size cap of their own (below the route's body limit).

Starlette's form parser streams a file part into a `tempfile.SpooledTemporaryFile` that moves to
disk past 1 MiB, with the disk writes in the thread pool, while `RequestGuardMiddleware` counts the
body against the route's limit; so an upload is never held whole in memory before the route runs.
"""

from __future__ import annotations

from fastapi import UploadFile

from service.errors import InvalidInput, PayloadTooLarge


def read_upload(upload: UploadFile, max_bytes: int, what: str, setting: str) -> bytes:
    """The bytes of an uploaded file, at most `max_bytes` of them.

    Call from a sync route: the file is read from its spooled temporary file without the event loop.

    Raises:
        PayloadTooLarge: The file is larger than `max_bytes`.
        InvalidInput: The file is empty.
    """
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"the {what} is larger than the limit of {max_bytes} bytes (the server's {setting})",
            {"max_bytes": max_bytes},
        )
    if not data:
        raise InvalidInput(f"the {what} is empty")
    return data
