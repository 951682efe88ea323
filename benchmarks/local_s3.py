"""A moto S3 server on loopback, shared by the test fixtures and the benchmarks that measure object stores."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.harness import environment
from raytwin.ports import free_port

__all__ = ["local_s3", "new_bucket"]

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def local_s3() -> Iterator[str]:
    """Its endpoint URL, exported as RAYTWIN_S3_ENDPOINT_URL with dummy AWS keys while it runs (so RayTwin
    and Ray workers started meanwhile find it); the environment is restored afterwards. Needs `moto[server]`."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with environment({"RAYTWIN_S3_ENDPOINT_URL": endpoint, **_ENV}):
            yield endpoint
    finally:
        server.stop()


def new_bucket(endpoint: str) -> str:
    """A fresh, empty bucket on `endpoint`, as an s3:// URL."""
    import s3fs

    bucket = f"rt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"
