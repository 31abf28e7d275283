"""A dispatcher process for the crash tests to kill with SIGKILL.

    python -m tests.faults.worker ROOT NOW OWNER [--latency S]   one run, then exit
    python -m tests.faults.worker --serve ROOT [--latency S]     a fork server (below)

Starting Python and importing the engine takes about two seconds on a small machine, and the
crash test restarts a dispatcher more than twenty times, so `--serve` imports everything
once, then forks a fresh dispatcher process per `run NOW OWNER [LATENCY]` line on stdin.
Each child opens its own workspace, store and sandbox connections after the fork, as a new
process would; only imported modules are shared. The server and its children answer on
stdout, one line each:

    started PID        the child exists (kill this pid)
    running PID        it has loaded the workspace and is about to dispatch
    phase PID batch-N  it starts claiming its N-th batch
    phase PID sending  it calls the email provider (touches are `sending` in the store)
    phase PID accepted the provider has the batch; the outcome is not recorded yet
    exited PID CODE    the child is gone (CODE -9: it was killed)

A child's PostgreSQL sessions are named `relance-fault-PID` (PGAPPNAME), so the test can wait
until the server has rolled back a killed child's transaction before looking at the store.

`--latency S` makes the email provider take S seconds per touch, half before and half after
it accepts the batch, like a network round trip: much of a run is then spent between the
`sending` write and the recorded outcome, the window a crash must not turn into a resend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401 - imported once by the fork server, not per child
import sqlalchemy.dialects.sqlite  # noqa: F401

import connectors.sandbox  # registers every sandbox connector before a workspace asks
import relance.migrate
from relance.dispatch import Dispatcher
from relance.events import Channel
from relance.workspace import Workspace


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: parent and child share the pipe


def _instrument(ws: Workspace, dispatcher: Dispatcher, latency: float) -> None:
    """Say where the run is (the test kills within the first batch and records where it
    landed), and give the email provider a network round trip of `latency` s per touch."""
    pid = os.getpid()
    claim, batches = dispatcher.claim, [0]

    def counted_claim(now, limit=None):
        batches[0] += 1
        _say(f"phase {pid} batch-{batches[0]}")
        return claim(now, limit)

    dispatcher.claim = counted_claim  # type: ignore[method-assign]
    connector = ws.connector(Channel.email)
    send = connector.send_batch

    def send_batch(touches, now):
        _say(f"phase {pid} sending")
        time.sleep(latency * len(touches) / 2)
        results = send(touches, now)
        _say(f"phase {pid} accepted")  # the provider has it; the store does not know yet
        time.sleep(latency * len(touches) / 2)
        return results

    connector.send_batch = send_batch  # type: ignore[method-assign]


def dispatch_once(root: Path, now: datetime, owner: str, latency: float) -> dict:
    ws = Workspace.load(root)
    try:
        dispatcher = Dispatcher(ws, owner=owner)
        _instrument(ws, dispatcher, latency)
        ws.store  # noqa: B018 - connect (and check the schema) before saying we are running
        _say(f"running {os.getpid()}")
        return dispatcher.run(now).as_dict()
    finally:
        ws.close()


def serve(root: Path, latency: float) -> None:
    relance.migrate.head_revision()  # reads the migration scripts once, in the parent
    _say("ready")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        _, now, owner, *rest = words
        run_latency = float(rest[0]) if rest else latency
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            _say(f"started {os.getpid()}")  # from the child, so it always precedes `running`
            # libpq reads it: the test can see when PostgreSQL has dropped a killed child's session.
            os.environ["PGAPPNAME"] = f"relance-fault-{os.getpid()}"
            try:
                dispatch_once(root, datetime.fromisoformat(now.replace("Z", "+00:00")), owner, run_latency)
            except BaseException:  # noqa: BLE001 - reported on stderr, the exit code says it failed
                traceback.print_exc()
                sys.stderr.flush()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        _say(f"exited {pid} {os.waitstatus_to_exitcode(status)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.worker")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("args", nargs="+", help="ROOT [NOW OWNER]")
    ns = parser.parse_args(argv)
    root = Path(ns.args[0])
    if ns.serve:
        serve(root, ns.latency)
        return
    _, now, owner = ns.args
    summary = dispatch_once(root, datetime.fromisoformat(now.replace("Z", "+00:00")), owner, ns.latency)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
