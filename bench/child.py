"""A dispatch run in a fresh process, so its peak RSS is its own: `python -m bench.child ROOT`.

Prints one JSON line: seconds, the summary, RSS before the run and the peak RSS.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# (backend, enrollments) -> the child's result: the memory benchmark reuses the runs the
# throughput benchmark already made in this process rather than repeating them.
RUNS: dict[tuple[str, int], dict[str, Any]] = {}


def run_child(root: Path, key: tuple[str, int] | None = None) -> dict[str, Any]:
    """Dispatcher.run over the workspace at `root`, in a fresh Python process."""
    out = subprocess.run([sys.executable, "-m", "bench.child", str(root)], cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench.child failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if key is not None:
        RUNS[key] = result
    return result


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address space.

    Not ru_maxrss: Linux carries the parent's RSS at fork time into the child's ru_maxrss
    across exec, so a child of a big parent would report the parent's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    """`python -m bench.child ROOT [--start EPOCH] [--now ISO] [--log-sends FILE]`: --start waits
    (after the imports) until that wall-clock time so several workers begin together; --log-sends
    appends the idempotency key of every touch handed to a connector, one per line."""
    import argparse
    from datetime import datetime

    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--start", type=float)
    parser.add_argument("--now")
    parser.add_argument("--log-sends", type=Path)
    args = parser.parse_args()
    import psutil

    from bench.common import NOW
    from relance.dispatch import Dispatcher
    from relance.workspace import Workspace

    ws = Workspace.load(args.root)
    dispatcher = Dispatcher(ws)
    if args.log_sends is not None:
        log = args.log_sends.open("a", buffering=1)
        deliver = dispatcher.deliver

        def logged(channel: Any, outbound: Any, now: Any) -> Any:
            log.write("".join(f"{t.idempotency_key}\n" for t in outbound))
            log.flush()
            return deliver(channel, outbound, now)

        dispatcher.deliver = logged  # type: ignore[method-assign]
    with ws.store.connect():
        pass  # the engine and its first connection exist before the clock starts
    if args.start is not None:
        time.sleep(max(0.0, args.start - time.time()))
    rss_before = psutil.Process().memory_info().rss
    started_at = time.time()
    start, cpu = time.perf_counter(), time.process_time()
    summary = dispatcher.run(datetime.fromisoformat(args.now) if args.now else NOW)
    ws.close()  # timed, as in the flow: SQLite checkpoints its WAL on the last close
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss()
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu, "summary": summary.as_dict(), "rss_before": rss_before,
        "peak_rss": peak, "started_at": started_at, "ended_at": started_at + seconds,
    }))


if __name__ == "__main__":
    main()
