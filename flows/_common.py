"""What every flow needs: the workspace and the clock."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect.cache_policies import NO_CACHE

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
