"""What every flow needs: the workspace and the clock."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import certifi
from prefect.cache_policies import NO_CACHE
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

from relance.workspace import Workspace

# Touch batches are large and already persisted in the store: Prefect keeps no copy, and
# callers wrap them in `quote()` so Prefect does not walk them looking for futures.
TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}


def open_workspace(path: str) -> Workspace:
    return Workspace.load(Path(path))


def clock(now: datetime | None) -> datetime:
    """The simulated time if one is given (demo, preview, tests), else the real one."""
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def api_client_context() -> SyncClientContext:
    """A Prefect API client for the tasks run in this thread, with the TLS context Prefect
    would build itself, but built once per process: Prefect builds one per client and loads
    the whole CA bundle each time, some 25 ms of every dispatch run."""
    tls = _tls_context(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value(), PREFECT_API_SSL_CERT_FILE.value())
    return SyncClientContext(httpx_settings={"verify": tls})


@lru_cache(maxsize=4)
def _tls_context(skip_verify: bool, cert_file: str | None) -> ssl.SSLContext:
    if skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cert_file or certifi.where())
