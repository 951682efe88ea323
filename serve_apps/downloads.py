"""Stored files sent to a client (run output files, job result files): streamed from the store in chunks, never whole
in memory, with the SHA-256 their writer recorded as ``X-RayTwin-SHA256``, which the SDK checks and requires (a
missing header means a proxy stripped it)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import StreamingResponse
from fsspec import AbstractFileSystem

from raytwin.storage import read_chunks

SHA256_HEADER = "X-RayTwin-SHA256"


def file_responses(media_types: set[str], description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a file download route: its 200's media types and headers."""
    return {200: {"content": {t: {} for t in sorted(media_types)}, "description": description, "headers": {
        SHA256_HEADER: {"description": "the file's SHA-256 (hex) as its writer recorded it; the SDK checks the bytes "
                                       "against it", "schema": {"type": "string"}}}}}


def file_response(fs: AbstractFileSystem, path: str, sha256: str, media_type: str, filename: str,
                  size: int | None = None) -> StreamingResponse:
    """`path` on `fs` streamed as an attachment named `filename`, with its recorded `sha256` (and `size` as its
    Content-Length, where known)."""
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', SHA256_HEADER: sha256}
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(read_chunks(fs, path), media_type=media_type, headers=headers)
