"""A connector's dead letters, read from the store's dead-letter log by the ingress replica (no backend call).

The store keeps one tenant's dead letters together (`raytwin.statestore`: partitioned by tenant and day), without
the connector: a connector leads each reason with the source URI it came from (`mqtt://NAME/topic`,
`opcua://NAME/node`, `connectors.mapping.DeadLetter`), so a connector's are those whose reason names it there.
The rows the twin shards refuse (unknown twin, too late, implausible, conflict) are led by it too: the connector's
sink sends each row's source along (`actors.telemetry.SOURCE_COLUMN`). Those written before that carry none.
What was refused is cut to `connectors.mapping.RAW_KEPT` bytes here too, and any other text (reason, key, asset) to
`TEXT_KEPT` characters (`connectors.mapping.bounded`): dead letters written before those bounds were not.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.dataset as ds

from connectors.mapping import bounded, source_pattern
from raytwin.statestore import StateStore
from serve_apps.schemas import DeadLetter


def connector_dead_letters(store: StateStore, tenant: str, name: str, day: str | None,
                           limit: int) -> list[DeadLetter]:
    """The newest `limit` dead letters of `tenant`'s connector `name` (of one UTC ``YYYY-MM-DD`` `day`), oldest
    first, like the audit log's records. Only `tenant`'s partitions that hold them are read (tenants never see
    each other's), newest day first (`StateStore.newest_dead_letters`): a poison device's millions stay on disk."""
    ours = pc.match_substring_regex(ds.field("reason"), pattern=source_pattern(name))
    table = store.newest_dead_letters(tenant, limit, day=day, where=ours, columns=list(DeadLetter.model_fields),
                                      source=name)
    return [DeadLetter.model_validate(bounded(row)) for row in table.to_pylist()]
