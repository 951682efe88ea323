"""An S3 server on loopback (moto) for benchmarks that compare local disk with an object store."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def moto_bucket() -> Iterator[tuple[str, dict[str, Any]] | None]:
    """(an empty bucket's ``s3://`` URL, its fsspec options) on a moto server started for the
    block, with throw-away credentials; None when moto is not installed (``pip install 'moto[server]'``)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
    try:
        options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}", options
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
