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
    """One Prefect API client for everything a run does: its tasks, inline or in the task
    runner's threads, and its artifacts. Prefect builds a client per task otherwise, loading
    the whole CA bundle each time (some 20 ms): a tenth of a PostgreSQL dispatch's CPU.

    Its TLS context is the one Prefect would build, made once per process. `get_client()`
    hands out a context's client only if the context was made with the settings it is asked
    for, which is none: so the context says it was, as it is equivalent to that."""
    tls = _tls_context(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value(), PREFECT_API_SSL_CERT_FILE.value())
    context = SyncClientContext(httpx_settings={"verify": tls})
    context._httpx_settings = None
    return context


@lru_cache(maxsize=4)
def _tls_context(skip_verify: bool, cert_file: str | None) -> ssl.SSLContext:
    if skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cert_file or certifi.where())
