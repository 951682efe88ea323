"""Deterministic placement of twins on shard actors: the same (tenant, asset) always lands on the
same shard, in every process, so ingestion can route without asking anyone."""

from __future__ import annotations

import re
import zlib


def shard_index(tenant: str, asset_id: str, shards: int) -> int:
    """Stable shard of a twin: crc32 of ``tenant/asset_id`` modulo the shard count."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return zlib.crc32(f"{tenant}/{asset_id}".encode()) % shards


def shard_prefix(store_url: str) -> str:
    """The start of the Ray actor names of a store's shards (`shard_name`): which service a shard actor is of, for
    tools that list every service's actors on a cluster (`raytwin status`)."""
    return f"twinshard-{zlib.crc32(store_url.encode()):08x}"


def shard_name(store_url: str, index: int, shards: int) -> str:
    """The Ray actor name of a shard; it includes the store so two services never share actors."""
    return f"{shard_prefix(store_url)}-{index}-of-{shards}"


_SHARD_NAME = re.compile(r"^(twinshard-[0-9a-f]{8})-(\d+)-of-\d+$")


def shard_of(name: str | None) -> tuple[str, str] | None:
    """The service's `shard_prefix` and the shard index (as the metrics' ``shard`` tag gives it) of a Ray actor named
    by `shard_name`; None for another name, or none."""
    return (m.group(1), m.group(2)) if (m := _SHARD_NAME.match(name or "")) else None
