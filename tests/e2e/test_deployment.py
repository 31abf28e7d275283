"""The production topology in miniature: a real Prefect server, the repository's prefect.yaml
deployed to a process work pool, a process worker running the `dispatch` deployment against
the store. Slow (a server start and a worker subprocess), so it runs last."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from relance.enrollment import enroll
from relance.store import touches
from relance.workspace import Workspace
from tests.conftest import REPO, at, write_workspace
from tests.relance.test_engine import MONDAY, add_prospects, person

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def prefect_server(tmp_path: Path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.5)
    yield env
    server.terminate()
    server.wait(timeout=30)
    log.close()


def test_dispatch_deployment_runs_on_a_process_worker(prefect_server: dict[str, str], tmp_path: Path):
    # The worker machine's checkout: the workspace with the project's flows/ beside it.
    root = write_workspace(tmp_path / "checkout", f"sqlite:///{tmp_path / 'store.db'}")
    os.symlink(REPO / "flows", root / "flows")
    ws = Workspace.load(root)
    enroll(ws, ws.sequence("outbound"), add_prospects(ws, *[person(i) for i in range(20)]), MONDAY)
    ws.close()

    env = {**prefect_server, "RELANCE_WORKSPACE": str(root)}
    _prefect(env, "work-pool", "create", "relance", "--type", "process")
    _prefect(env, "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml"))
    run = _prefect(env, "deployment", "run", "dispatch/dispatch", "--param", "now=2027-03-15T09:30:00+00:00")
    assert "Created flow run" in run

    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "relance", "--run-once", "--type", "process"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr

    ws = Workspace.load(root)
    with ws.store.connect() as conn:
        sent = conn.scalar(select(func.count()).select_from(touches).where(touches.c.status == "sent"))
    ws.close()
    assert sent == 20, worker.stdout + worker.stderr
    assert len(list((root / "outbox" / "email").glob("*.eml"))) == 20
