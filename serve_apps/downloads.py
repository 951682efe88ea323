"""Stored files sent to a client (run output files, job result files): streamed from the store in chunks, never whole
in memory, with the SHA-256 their writer recorded as ``X-RayTwin-SHA256``, which the SDK checks and requires (a
missing header means a proxy stripped it), for as long as the caller's key allows it.

A download of a large file lasts minutes, and its key was checked only when it began: a key revoked meanwhile kept
receiving the file. So a download checks its key again as a change stream does (`serve_apps.stream_auth`: before a
chunk once `STREAM_AUTH_RECHECK_S` has passed since the last check), and a key that no longer allows it ends the
download, logged and audited (``file_download.end``). An answer cannot change its status once begun, so the
response ends without its last message: the server cuts the connection, the client sees a transfer cut short (never
a whole file), and its resend gets the 401 (or 403, 503) a new request gets, which the SDK raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from typing import Any

from fastapi.responses import StreamingResponse
from fsspec import AbstractFileSystem
from starlette.types import Send

from raytwin.storage import read_chunks
from serve_apps.stream_auth import StreamCredential

SHA256_HEADER = "X-RayTwin-SHA256"


def file_responses(media_types: set[str], description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a file download route: its 200's media types and headers."""
    return {200: {"content": {t: {} for t in sorted(media_types)}, "description": description, "headers": {
        SHA256_HEADER: {"description": "the file's SHA-256 (hex) as its writer recorded it; the SDK checks the bytes "
                                       "against it", "schema": {"type": "string"}}}}}


class KeyCheckedStream(StreamingResponse):
    """A streamed answer that checks its key before each chunk (at most once per `credential.recheck_s`) and, once the
    key no longer allows it, ends without its last message: the server closes the connection mid-answer."""

    def __init__(self, content: Iterable[bytes] | AsyncIterable[bytes], credential: StreamCredential,
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self.credential = credential

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            if await self.credential.ended() is not None:  # logged and audited by the credential
                return  # no final message: the ASGI server cuts the connection
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def file_response(fs: AbstractFileSystem, path: str, sha256: str, media_type: str, filename: str,
                  credential: StreamCredential, size: int | None = None) -> StreamingResponse:
    """`path` on `fs` streamed as an attachment named `filename` while `credential`'s key allows it, with its recorded
    `sha256` (and `size` as its Content-Length, where known)."""
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', SHA256_HEADER: sha256}
    if size is not None:
        headers["Content-Length"] = str(size)
    return KeyCheckedStream(read_chunks(fs, path), credential, media_type=media_type, headers=headers)
