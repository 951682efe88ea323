"""The server's `Deprecation`/`Sunset` headers (RFC 9745, RFC 8594) surfaced as Python warnings.

A deprecated API version or asset type version keeps working until its sunset; a caller who never
looks at response headers would only learn of it when it stops. The client warns once per route
(method and path template) and client, so a loop over ten thousand assets warns once, not ten
thousand times.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx


class RayTwinDeprecationWarning(FutureWarning):
    """A route answered with `Deprecation` (shown by default, unlike `DeprecationWarning`): move off it
    before `sunset` (None: not decided); `link` names the migration guide when the server gave one."""

    def __init__(self, route: str, deprecated_at: datetime | None, sunset: datetime | None, link: str | None):
        when = f"sunset {sunset.isoformat()}" if sunset else "no sunset date yet"
        super().__init__(f"{route} is deprecated ({when})" + (f": see {link}" if link else ""))
        self.route, self.deprecated_at, self.sunset, self.link = route, deprecated_at, sunset, link


def _deprecated_at(value: str) -> datetime | None:
    """RFC 9745's ``@<unix seconds>`` (None: unparsable, still deprecated)."""
    try:
        return datetime.fromtimestamp(int(value.removeprefix("@")), tz=UTC)
    except ValueError:
        return None


def _sunset(value: str | None) -> datetime | None:
    try:
        return parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None


def _link(value: str | None) -> str | None:
    """The target of the ``rel="deprecation"`` link, if any."""
    for part in (value or "").split(","):
        target, _, params = part.partition(";")
        if 'rel="deprecation"' in params.replace(" ", ""):
            return target.strip().strip("<>")
    return None


class DeprecationNotices:
    """Remembers which routes already warned (one per client)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def observe(self, method: str, route: str, response: httpx.Response) -> None:
        value = response.headers.get("deprecation")
        key = f"{method} {route}"
        if value is None or key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(RayTwinDeprecationWarning(key, _deprecated_at(value), _sunset(response.headers.get("sunset")),
                                                _link(response.headers.get("link"))), stacklevel=4)
