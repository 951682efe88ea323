"""Log lines of RayTwin's components (``key=value`` messages under the ``raytwin`` logger)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def component_logging(level: int = logging.INFO) -> None:
    """Make the ``raytwin`` logger's records at `level` reach stderr in this process.

    For long-lived components in Ray worker processes (Serve replicas, twin shards): there the root
    logger has no handler, so ``raytwin.*`` INFO records (shard started, events rejected, jobs
    queued) were silently dropped. Ray captures a worker's stderr into its log files, which the
    dashboard and ``ray logs`` show. Where the process already has handlers (a CLI's
    ``basicConfig``, pytest, Ray's ``LoggingConfig``) records go to them and nothing is added, so
    no line is written twice.
    """
    logger = logging.getLogger("raytwin")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
