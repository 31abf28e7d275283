"""What every flow needs: the workspace and the clock."""

from __future__ import annotations

import asyncio
import inspect
import ssl
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import certifi
from prefect.cache_policies import NO_CACHE
from prefect.context import AsyncClientContext, SyncClientContext
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

from relance.workspace import Workspace

# Touch batches are large and already persisted in the store: Prefect keeps no copy, and
# callers wrap them in `quote()` so Prefect does not walk them looking for futures.
TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}
# A run's outcome is in the store, its logs and its artifacts: Prefect keeps no copy of the
# return value either (and so does not ask the server for its default result storage per run).
FLOW_OPTIONS = {"log_prints": False, "persist_result": False}


def open_workspace(path: str) -> Workspace:
    return Workspace.load(Path(path))


def clock(now: datetime | None) -> datetime:
    """The simulated time if one is given (demo, preview, tests), else the real one."""
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def call_flow(flow: Callable[..., Any], **parameters: Any) -> Any:
    """Run a flow from sync code (`relance serve`, `relance run`, the simulated clock), an
    async one (dispatch) to completion, with one Prefect API client of each kind for the run
    and its engine. Prefect's engine otherwise builds two clients of its own per run, each
    loading the whole CA bundle: 70 to 80 ms apiece on a busy 2-core machine, paid by every
    tick of a process that fires flows all day."""
    with api_client_context():
        result = flow(**parameters)
        if inspect.iscoroutine(result):
            result = asyncio.run(_with_async_client(result))
        return result


async def _with_async_client(run: Coroutine[Any, Any, Any]) -> Any:
    async with _client_context(AsyncClientContext):
        return await run


def api_client_context() -> SyncClientContext:
    """One Prefect API client for everything a run does: its tasks, inline or in the task
    runner's threads, and its artifacts; the caller's, when `call_flow` made one. Prefect
    builds a client per task otherwise, loading the whole CA bundle each time (some 20 ms): a
    tenth of a PostgreSQL dispatch's CPU."""
    return SyncClientContext.get() or _client_context(SyncClientContext)


def _client_context(kind: type[Any]) -> Any:
    """A client context with the TLS context Prefect would build, made once per process.
    `get_client()` hands out a context's client only if the context was made with the
    settings it is asked for, which is none: so the context says it was, as it is equivalent
    to that."""
    tls = _tls_context(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value(), PREFECT_API_SSL_CERT_FILE.value())
    context = kind(httpx_settings={"verify": tls})
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
