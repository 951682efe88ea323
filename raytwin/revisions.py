"""A document replaced whole by conditional writes: each save is a new numbered revision, created only where that
number is free, so of two writers that read one revision the first to save wins and the other is refused.

Why: `raytwin.storage.replace_file` replaces whatever is there. A service fenced between its read of the store's lease
and its save (the takeover window) replaced the document its successor had saved since with the state it had read
before. A conditional replace (S3's ``If-Match``) has no local-disk counterpart short of a lock every writer takes;
an exclusive create (`raytwin.storage.write_once`) works on both.

Layout: ``{folder}/{revision:016d}.json``, readers take the newest; before the first save, the document at its old
single name (`legacy`) is revision 0. A save deletes the revisions older than its own, so a number may be free again
for a writer that read one of those: a save that finds a newer revision once its own landed is refused too (its file
deleted), so the check holds however far behind the writer is.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any

from raytwin.storage import write_once
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.revisions")

SUFFIX = ".json"


class DocumentMoved(Exception):
    """The document is no longer at the revision the writer read: another writer saved it since."""


class Revisions:
    """One document's revisions in `folder` of filesystem `fs`; `legacy`: its path before it had revisions."""

    def __init__(self, fs: Any, folder: str, legacy: str | None = None):
        self.fs, self.folder, self.legacy = fs, folder, legacy

    @store_io("read")
    def read(self) -> tuple[int, bytes | None]:
        """The newest revision and its bytes: (0, the legacy document's, or None where there is none) before the first
        save. A revision deleted between the listing and its read (a newer one was saved) is listed again."""
        while revisions := self._revisions():
            with suppress(FileNotFoundError):
                return revisions[-1], self.fs.cat_file(self._path(revisions[-1]))
        if self.legacy is not None and self.fs.exists(self.legacy):
            return 0, self.fs.cat_file(self.legacy)
        return 0, None

    @store_io("write")
    def write(self, revision: int, data: bytes) -> None:
        """Save `data` as `revision`, the one read plus 1: `DocumentMoved` where another writer saved that one, or a
        later one, first. Then delete the older revisions (and the legacy document): a failure there is logged, and
        the next save deletes them."""
        path = self._path(revision)
        try:
            write_once(self.fs, path, data)
        except FileExistsError:
            raise DocumentMoved(f"{path} was saved by another writer") from None
        revisions = self._revisions()
        if revisions[-1:] > [revision]:
            with suppress(FileNotFoundError):
                self.fs.rm(path)
            raise DocumentMoved(f"revision {revisions[-1]} of {self.folder} was saved after {revision - 1}, read here")
        try:
            for older in revisions[:-1]:
                with suppress(FileNotFoundError):
                    self.fs.rm(self._path(older))
            if self.legacy is not None and self.fs.exists(self.legacy):
                self.fs.rm(self.legacy)
        except Exception as exc:  # noqa: BLE001 - saved; the next save deletes them
            log.warning("event=revisions_not_deleted folder=%s error=%s: %s", self.folder, type(exc).__name__, exc)

    def _path(self, revision: int) -> str:
        return f"{self.folder}/{revision:016d}{SUFFIX}"

    def _revisions(self) -> list[int]:
        if not self.fs.exists(self.folder):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[1] for p in self.fs.ls(self.folder, detail=False))
        return sorted(int(n.removesuffix(SUFFIX)) for n in names if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit())
