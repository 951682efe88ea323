"""A fake Kubernetes API server for the ray.io custom-resource and NetworkPolicy REST paths, recording every
request, with the garbage collector's owner-reference semantics."""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PATH = re.compile(
    r"^/apis/(ray\.io|networking\.k8s\.io)/v1/namespaces/(?P<ns>[^/]+)/"
    r"(?P<plural>rayclusters|rayservices|rayjobs|networkpolicies)(/(?P<name>[^/?]+))?"
)


@dataclass
class Request:
    method: str
    path: str
    body: dict[str, Any] | None


class FakeKubeApi:
    """In-memory custom objects behind http.server on 127.0.0.1, with Kubernetes' 404/409 semantics, a `uid` per
    created object, lists filtered by `labelSelector`, and deletes followed at once by the garbage collector's
    work (`garbage_collector=False`: it has not run yet)."""

    def __init__(self, garbage_collector: bool = True) -> None:
        self.garbage_collector = garbage_collector
        self.forbidden: set[tuple[str, str]] = set()
        """(method, plural) pairs RBAC refuses (403), e.g. ("GET", "networkpolicies")."""
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[Request] = []
        self._versions = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with fake._lock:
                    fake.requests.append(Request(self.command, self.path, body))
                    status, payload = fake._dispatch(self.command, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "message": message, "code": code}

    def _dispatch(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        match = _PATH.match(path)
        if match is None:
            return self._status(404, "NotFound", f"unknown path {path}")
        ns, plural = match["ns"], match["plural"]
        if (method, plural) in self.forbidden:
            return self._status(403, "Forbidden", f"{plural} is forbidden: cannot {method} in namespace {ns}")
        name = match["name"] or (body or {}).get("metadata", {}).get("name", "")
        key = (ns, plural, name)
        current = self.objects.get(key)
        if method == "POST" and match["name"] is None:
            if current is not None:
                return self._status(409, "AlreadyExists", f"{plural} {name!r} already exists")
            return 201, self._store(key, body or {})
        if method == "GET" and match["name"] is None:
            return 200, self._list(ns, plural, parse_qs(urlsplit(path).query).get("labelSelector", [""])[0])
        if current is None:
            return self._status(404, "NotFound", f"{plural} {name!r} not found")
        if method == "GET":
            return 200, current
        if method == "PUT":
            if (body or {}).get("metadata", {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict", "the object has been modified")
            return 200, self._store(key, body or {}, uid=current["metadata"]["uid"])
        if method == "DELETE":
            del self.objects[key]
            if self.garbage_collector:
                self.collect_garbage()
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return self._status(405, "MethodNotAllowed", method)

    def _list(self, ns: str, plural: str, selector: str) -> dict[str, Any]:
        wanted = dict(pair.split("=", 1) for pair in selector.split(",") if pair)
        items = [obj for (namespace, kind, _), obj in self.objects.items() if (namespace, kind) == (ns, plural)
                 and wanted.items() <= (obj["metadata"].get("labels") or {}).items()]
        return {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._versions)},
                "items": items}

    def collect_garbage(self) -> None:
        """What Kubernetes' garbage collector does after a delete (background propagation): objects whose owners
        are all gone are deleted, then their own dependents; the others lose their references to gone owners."""
        while orphans := [key for key, obj in self.objects.items() if obj["metadata"].get("ownerReferences")
                          and not self._live_owners(obj)]:
            for key in orphans:
                del self.objects[key]
        for obj in self.objects.values():
            if "ownerReferences" in obj["metadata"]:
                obj["metadata"]["ownerReferences"] = self._live_owners(obj)

    def _live_owners(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        uids = {stored["metadata"]["uid"] for stored in self.objects.values()}
        return [ref for ref in obj["metadata"].get("ownerReferences", []) if ref["uid"] in uids]

    def _store(self, key: tuple[str, str, str], body: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
        self._versions += 1
        metadata = {**body.get("metadata", {}), "resourceVersion": str(self._versions), "uid": uid or str(uuid.uuid4())}
        self.objects[key] = stored = {**body, "metadata": metadata}
        return stored
