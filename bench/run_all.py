"""`make bench`: run every benchmark script, print each figure as `name=value`, then a short table.

Each script prints its own `name=value` lines from one run; this runner only collects them. A script that
fails is reported (with its last lines) and the others still run. GPU benchmarks are skipped where
torch sees no GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "plan_bench.py",
    "throughput_bench.py",
    "sizing_accuracy_bench.py",
    "operator_scale_bench.py",
    "gpu_bench.py",
]
LINE = re.compile(r"^([a-z][a-z0-9_]*)=(\S+)$")


def main() -> int:
    figures: list[tuple[str, str, str]] = []
    failed = []
    for script in SCRIPTS:
        path = HERE / script
        if not path.exists():
            print(f"# {script}: not present, skipped", flush=True)
            continue
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
        took = time.perf_counter() - start
        for line in result.stdout.splitlines():
            match = LINE.match(line.strip())
            if match:
                print(line.strip(), flush=True)
                figures.append((script, match.group(1), match.group(2)))
            elif line.startswith("#"):
                print(line, flush=True)
        if result.returncode != 0:
            failed.append(script)
            tail = "\n".join((result.stderr or result.stdout).splitlines()[-15:])
            print(f"# {script} FAILED (exit {result.returncode}, {took:.0f} s):\n{tail}", flush=True)
    print()
    width = max((len(n) for _, n, _ in figures), default=10)
    print(f"{'benchmark':<28} {'figure':<{width}} value")
    for script, name, value in figures:
        print(f"{script:<28} {name:<{width}} {value}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
