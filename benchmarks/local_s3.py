"""A moto S3 server on loopback, shared by the test fixtures and the benchmarks that measure object stores."""

from __future__ import annotations

import logging
import threading
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
        with _atomic_conditional_writes(), environment({"RAYTWIN_S3_ENDPOINT_URL": endpoint, **_ENV}):
            yield endpoint
    finally:
        server.stop()


@contextmanager
def _atomic_conditional_writes() -> Iterator[None]:
    """Moto's server (in this process) checks a conditional write's ``If-None-Match`` / ``If-Match`` and then writes,
    with no lock between: two racing creates of one name both got 200 (2 of 8 writers won, seen under load), where S3
    answers one 200 and the others 412. RayTwin's exclusive writes (`raytwin.storage.write_once`) rely on S3's answer,
    so the stand-in takes one conditional write (and completion of a conditional multipart upload) at a time."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    originals = {name: getattr(S3Response, name) for name in ("put_object", "_key_response_post")}

    def serialised(original):
        def handler(self, *args, **kwargs):
            if self.headers.get("If-None-Match") or self.headers.get("If-Match"):
                with lock:
                    return original(self, *args, **kwargs)
            return original(self, *args, **kwargs)
        return handler

    for name, original in originals.items():
        setattr(S3Response, name, serialised(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(S3Response, name, original)


def new_bucket(endpoint: str) -> str:
    """A fresh, empty bucket on `endpoint`, as an s3:// URL."""
    import s3fs

    bucket = f"rt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"
