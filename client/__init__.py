"""The Python client of the RayTwin HTTP API (sync and asyncio), typed on the server's own contracts.

    from client import RayTwinClient
    with RayTwinClient("http://localhost:8000", api_key) as api:
        zone = api.get_asset("zone-1")            # Revisioned[Asset]: .value, .revision, .etag
        api.update_asset("zone-1", update, if_match=zone.etag)
        for change in api.changes(after=0):       # resumes by itself
            ...
        job = api.wait_job(job_id, timeout_s=600)  # polls with backoff until it succeeded

See client/README.md.
"""

from client.aio import AsyncRayTwinClient
from client.calls import Revisioned
from client.deprecation import RayTwinDeprecationWarning
from client.jobs import JobFailed, JobTimeout
from client.retry import RetryPolicy
from client.sync import RayTwinClient

__all__ = ["AsyncRayTwinClient", "JobFailed", "JobTimeout", "RayTwinClient", "RayTwinDeprecationWarning", "Revisioned",
           "RetryPolicy"]
