"""Following the change stream: SSE parsing and the resume point, shared by the sync and async clients.

The client keeps the id of the last frame it received (events, and the bare `id:` frames the
server sends at the start and after filtered changes) and reconnects with `Last-Event-ID` after
a dropped connection, a restarted replica or a `fell_behind` event: the stream continues with
no gap and no duplicate (serve_apps/README.md, "Change stream").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serve_apps.changes import Change

STREAM_READ_TIMEOUT_S = 45.0
"""No byte for this long (the server sends a keep-alive every 15 s): the connection is dead, reconnect."""


@dataclass
class Subscription:
    after: int | None = None
    asset_ids: tuple[str, ...] = ()
    type_name: str | None = None
    kinds: tuple[str, ...] = ()
    last_id: int | None = None
    fell_behind: bool = False
    _frame: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.last_id = self.after

    def request(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(query, headers) of the next connection: from the last id received, else from `after`/now."""
        self.fell_behind, self._frame = False, {}
        params: dict[str, Any] = {"asset_id": list(self.asset_ids), "kind": list(self.kinds)}
        if self.type_name is not None:
            params["type_name"] = self.type_name
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return params, headers

    def feed(self, lines: Iterable[str]) -> list[Change]:
        """The changes completed by these lines; notes ids and `fell_behind`."""
        out = []
        for line in lines:
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    self._frame[name] = value[1:] if value.startswith(" ") else value
                continue
            frame, self._frame = self._frame, {}
            if frame.get("id", "").isdigit():
                self.last_id = int(frame["id"])
            if frame.get("event") == "fell_behind":
                self.fell_behind = True
            elif "data" in frame and frame.get("event"):
                out.append(Change.model_validate_json(frame["data"]))
        return out
