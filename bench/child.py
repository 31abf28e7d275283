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
    root = sys.argv[1]
    import psutil

    from bench.common import NOW
    from relance.dispatch import Dispatcher
    from relance.workspace import Workspace

    ws = Workspace.load(root)
    dispatcher = Dispatcher(ws)
    with ws.store.connect():
        pass  # the engine and its first connection exist before the clock starts
    rss_before = psutil.Process().memory_info().rss
    start, cpu = time.perf_counter(), time.process_time()
    summary = dispatcher.run(NOW)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss()
    ws.close()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "summary": summary.as_dict(), "rss_before": rss_before, "peak_rss": peak}))


if __name__ == "__main__":
    main()
