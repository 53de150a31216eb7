"""`python bench/kopf_tracemalloc.py run ...`: kopf's CLI under tracemalloc, for operator_scale_bench's heap profile.

`FT_BENCH_TRACEMALLOC_FRAMES` frames are kept per allocation (default 1). Each SIGUSR1 takes a snapshot
(allocations of tracemalloc itself left out) and writes `FT_BENCH_TRACEMALLOC_OUT.<k>.json` (k = 0, 1, ...):
the traced total, and per source line and per file the size and count of live blocks; from the second
snapshot on also the growth against the first, per line and per file. The operator's code is untouched:
this module only starts tracemalloc, installs the signal handler and hands over to kopf's CLI.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from typing import Any

TOP = 25
_snapshots: list[tracemalloc.Snapshot] = []


def _stats(stats: list[Any], diff: bool) -> list[dict[str, Any]]:
    out = []
    for stat in stats[:TOP]:
        frame = stat.traceback[0]
        row = {"where": f"{frame.filename}:{frame.lineno}", "size": stat.size, "count": stat.count}
        if diff:
            row.update(size_diff=stat.size_diff, count_diff=stat.count_diff)
        out.append(row)
    return out


def _dump(signum: int, frame: Any) -> None:
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    snap = tracemalloc.take_snapshot().filter_traces(filters)
    _snapshots.append(snap)
    traced, peak = tracemalloc.get_traced_memory()
    result: dict[str, Any] = {
        "traced": traced, "peak": peak, "total": sum(s.size for s in snap.statistics("filename")),
        "by_line": _stats(snap.statistics("lineno"), False),
        "by_file": _stats(snap.statistics("filename"), False),
    }
    if len(_snapshots) > 1:
        first = _snapshots[0]
        result["growth_by_line"] = _stats(snap.compare_to(first, "lineno"), True)
        result["growth_by_file"] = _stats(snap.compare_to(first, "filename"), True)
    path = f"{os.environ.get('FT_BENCH_TRACEMALLOC_OUT', 'tracemalloc')}.{len(_snapshots) - 1}.json"
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    tracemalloc.start(int(os.environ.get("FT_BENCH_TRACEMALLOC_FRAMES", "1")))
    signal.signal(signal.SIGUSR1, _dump)
    from kopf.cli import main as kopf_main

    sys.argv[0] = "kopf"
    kopf_main()


if __name__ == "__main__":
    main()
